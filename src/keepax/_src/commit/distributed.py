"""Writing one checkpoint from several JAX processes.

The protocol (``docs/FORMAT.md`` §3.1 and §14):

1. Process 0 picks the staging directory and tells everyone (on rename backends).
2. Every process writes the cells assigned to it (``tables.py``) into its own data files, then
   its chunk table, and makes them durable.
3. Every process reports success (with its table's size and checksum) or its error; everyone
   learns every report. If any process failed, every process raises, and nothing is committed.
4. Process 0 writes the manifest and the commit marker and commits; everyone learns the
   outcome and returns or raises the same way.

A process that dies never reports: the others time out (or the JAX runtime stops them), and
the step is never committed; its leftovers are cleaned up by the next manager start.

With ``host_local`` every process saves into its own directory (a local disk per host): each
writes every cell it holds, and commits its own copy of the manifest after step 3.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from keepax._src.commit.coordination import Coordinator
from keepax._src.format import datafiles as format
from keepax._src.format import tables
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import (
    COMMIT_FILE,
    MANIFEST_FILE,
    TABLES_VERSION,
    CommitMarker,
    TableRef,
)
from keepax.errors import CheckpointExistsError, KeepaxError

if TYPE_CHECKING:
    from keepax._src.checkpoint.snapshot import PreparedSave, SaveResult

__all__ = ["write_distributed", "SYNC_TIMEOUT"]

SYNC_TIMEOUT = 600.0
"""Default seconds a process waits for the others at each stage of a multi-process save."""


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _raise_reports(
    reports: Sequence[Any], what: str, where: str, step: int | None
) -> None:
    """Raises on every process if any process reported an error."""
    failed = [(i, r["error"]) for i, r in enumerate(reports) if r.get("error")]
    if not failed:
        return
    lines = "; ".join(f"process {i}: {text}" for i, text in failed[:8])
    more = f"; and {len(failed) - 8} more" if len(failed) > 8 else ""
    exists = all(reports[i].get("exists") for i, _ in failed)
    cls = CheckpointExistsError if exists else KeepaxError
    raise cls(f"the save failed while {what} on {len(failed)} of {len(reports)} processes "
              f"({lines}{more}); nothing was committed: fix the cause on the named processes "
              "(their logs have the details) and save again", path=where, step=step)


def write_distributed(
    prepared: PreparedSave,
    sources: Sequence[ChunkSource] | None,
    *,
    coordinator: Coordinator,
    timeout: float,
    step: int | None = None,
    before_commit: Callable[[], None] | None = None,
) -> SaveResult:
    """Writes this process's share of a checkpoint and takes part in its commit.

    Every process of the run must call this for the same checkpoint, in the same order as
    their other saves.

    Args:
      prepared: What ``snapshot.prepare_save`` returned (planned with an assigner).
      sources: The chunks to write, in place of ``prepared.plan.sources``.
      coordinator: The processes' coordinator.
      timeout: Seconds to wait for the other processes at each step.
      step: The step, for messages.
      before_commit: Called on every process once its data is durable; if it raises on any
        process, nothing is committed.

    Returns:
      What this process wrote.

    Raises:
      KeepaxError: this or another process failed (the message names them and their errors),
        or a process did not arrive in time; nothing was committed.
      CheckpointExistsError: the checkpoint exists and ``overwrite`` was not given.
    """
    from keepax._src.checkpoint.snapshot import SaveResult, _delete_quietly  # noqa: PLC0415 - cycle

    began = time.perf_counter()
    storage, name, where = prepared.storage, prepared.name, prepared.where
    plan = prepared.plan
    me, host_local = coordinator.process_index, prepared.host_local
    key = f"save{prepared.serial}"
    sync = {"timeout": timeout, "step": step, "path": where}
    leader = host_local or me == 0

    if host_local:
        staging = storage.staging_name(name)
    else:
        chosen = None
        if me == 0:
            try:
                storage.begin_write(name, replace=prepared.overwrite)
                chosen = {"staging": storage.staging_name(name)}
            except Exception as e:  # noqa: BLE001 - reported to every process
                chosen = {"error": _error_text(e)}
        chosen = coordinator.broadcast(f"{key}.staging", chosen, **sync)
        if "error" in chosen:
            raise KeepaxError(f"the save could not start on process 0: {chosen['error']}; "
                              "nothing was written: fix the cause and save again",
                              path=where, step=step)
        staging = chosen["staging"]

    report: dict[str, Any] = {}
    try:
        if host_local:
            storage.begin_write(name, replace=prepared.overwrite)
        files, chunks = format.write_data_files(
            storage, staging, plan.sources if sources is None else sources,
            prefix=f"p{me:05d}",
        )
        cells = {i: extra["cells"] for i, (_, _, _, extra) in plan.arrays.items()}
        private, shared = tables.split_shared(
            cells, plan.layouts,
            ((leaf, c) for leaf, pairs in sorted(chunks.items()) for _, c in pairs),
        )
        written = sum(f.nbytes for f in files)
        refs = []
        for is_shared, entries in ((False, private), (True, shared)):
            if is_shared and not entries:
                continue  # every process has a private table, maybe empty; shared ones if any
            table = tables.encode_table(me, files, entries)
            table_path = tables.table_name(me, is_shared)
            storage.write_bytes(f"{staging}/{table_path}", table)
            written += len(table)
            refs.append([me, table_path, len(table), format.checksum(table), is_shared])
        storage.sync_dir(f"{staging}/data")
        if before_commit is not None:
            before_commit()
        report = {"tables": refs}
    except Exception as e:  # noqa: BLE001 - reported to every process
        report = {"error": _error_text(e)}
    reports = coordinator.all_gather(f"{key}.written", report, **sync)
    try:
        _raise_reports(reports, "writing data", where, step)
    except KeepaxError:
        if storage.atomic_rename and leader:
            _delete_quietly(storage, staging)
        raise

    outcome: dict[str, Any] = {}
    if leader:
        try:
            refs = [TableRef(*t) for r in reports for t in r["tables"]]
            if host_local:
                refs = [r for r in refs if r.process == me]
            manifest = plan.manifest(
                (), {}, prepared.metadata, created=time.time(), tables=refs, layouts=plan.layouts
            )
            manifest_bytes = manifest.to_json()
            storage.write_bytes(f"{staging}/{MANIFEST_FILE}", manifest_bytes)
            marker = CommitMarker(TABLES_VERSION, len(manifest_bytes),
                                  format.checksum(manifest_bytes), time.time())
            marker_bytes = marker.to_json()
            storage.write_bytes(f"{staging}/{COMMIT_FILE}", marker_bytes)
            written += len(manifest_bytes) + len(marker_bytes)
            try:
                storage.commit(staging, name, replace=prepared.overwrite)
            except FileExistsError:
                outcome = {"error": "the checkpoint exists (another save created it first)",
                           "exists": True}
        except Exception as e:  # noqa: BLE001 - reported to every process
            outcome = {"error": _error_text(e)}
        if outcome and storage.atomic_rename:
            _delete_quietly(storage, staging)
    if host_local:
        outcomes = coordinator.all_gather(f"{key}.committed", outcome, **sync)
        _raise_reports(outcomes, "committing", where, step)
    else:
        outcome = coordinator.broadcast(f"{key}.committed", outcome if me == 0 else None, **sync)
        _raise_reports([outcome], "committing on process 0", where, step)
    return SaveResult(where, written, len(files), time.perf_counter() - began)
