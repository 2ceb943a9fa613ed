"""Writing one checkpoint from several JAX processes.

The protocol (``docs/FORMAT.md`` §3.1 and §14), around the one commit protocol of
:mod:`keepax._src.commit.protocol`:

0. Before anything is written, every process joins one agreement (:func:`agree`, called
   when the save is prepared): each says what it saves (path, step, a digest of the tree's
   structure and of the values every process must hold alike) and whether its preparation
   failed; process 0 adds a fresh save id. If any process failed or disagrees, every process
   raises :class:`~keepax.errors.PeerProcessError` at once and nothing is written. Every later
   collective of the save is named by the save id, and every chunk table carries it.
1. Process 0 begins the save and tells everyone where to write (the staging directory).
2. Every process writes the cells assigned to it (``tables.py``) into its own data files, then
   its chunk table, and makes them durable.
3. Every process reports success (with its table's size and checksum) or its error; everyone
   learns every report. If any process failed, every process raises, and nothing is committed.
4. Process 0 writes the manifest and the commit marker and commits; everyone learns the
   outcome and returns or raises the same way.

A process that dies never reports: the others time out (or the JAX runtime stops them), and
the step is never committed; its leftovers are cleaned up by the next manager start.

With ``host_local`` every process saves into its own directory (a local disk per host): each
begins its own save, writes every cell it holds, and commits its own copy of the manifest
after step 3.

This layer knows nothing of trees or plans: the checkpoint layer describes one process's part
of a save as a :class:`DistributedSave`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from keepax._src.commit import protocol
from keepax._src.commit.coordination import JSON, Coordinator
from keepax._src.commit.protocol import SaveResult, Staging
from keepax._src.format import datafiles, tables
from keepax._src.format.codecs import Compression
from keepax._src.format.datafiles import ChunkSource, DataFile
from keepax._src.format.manifest import CellRef, Chunk, Layout, Manifest, TableRef
from keepax._src.io import Storage
from keepax.errors import CheckpointExistsError, KeepaxError, PeerProcessError

__all__ = ["Agreement", "DistributedSave", "Proposal", "StoreHooks", "SYNC_TIMEOUT", "agree",
           "write_distributed"]

SYNC_TIMEOUT = 600.0
"""Default seconds a process waits for the others at each stage of a multi-process save."""


class StoreHooks(Protocol):
    """A multi-process incremental save's chunk store (``checkpoint/incremental.py``), as
    this protocol drives it on each process."""

    def announce(self) -> list[str]:
        """Process 0, beginning the save: the store files it means to delete (sent to every
        process with the staging directory)."""

    def heard(self, files: list[str]) -> None:
        """Every process, before it writes: process 0 announced ``files`` (forget them;
        process 0 then deletes those still unreferenced)."""

    def write(self, sources: Sequence[ChunkSource]
              ) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]], int]:
        """Writes this process's new chunks into the store, durably; returns the files its
        chunks are in (store references), the chunks, and the bytes written."""

    def committed(self, files: list[str]) -> None:
        """Every process, once the step is committed: the store files its tables name."""

    def abandoned(self) -> None:
        """Every process, once the save failed: drops what it wrote and chose."""


@dataclasses.dataclass(frozen=True)
class DistributedSave:
    """This process's part of a multi-process save.

    Attributes:
      storage: Where the checkpoint goes.
      name: Its name in ``storage``.
      where: Its path for messages.
      overwrite: Whether it replaces an existing checkpoint.
      sources: The chunks this process writes (of the cells assigned to it).
      cells: Per array leaf index, the cell layout entry its chunks belong to.
      layouts: The cell layouts ``cells`` refer to.
      manifest: Makes the manifest from every process's chunk tables (called on the
        committing process only, once all data is durable).
      coordinator: How this process meets the others.
      save_id: The save's id (from :func:`agree`): names its collectives and is written into
        every chunk table.
      host_local: Every process saves into its own directory.
      timeout: Seconds to wait for the other processes at each stage.
      step: The step, for messages.
      block_crcs: Checksum large chunks block by block too (format 1.2, so that readers
        resharding the checkpoint read only the parts of chunks they need).
      compression: How this process compresses its chunks (None: not at all).
      store: An incremental save's chunk store (None: every chunk is written into the
        checkpoint).
    """

    storage: Storage
    name: str
    where: str
    overwrite: bool
    sources: Sequence[ChunkSource]
    cells: Mapping[int, CellRef]
    layouts: Sequence[Layout]
    manifest: Callable[[Sequence[TableRef]], Manifest]
    coordinator: Coordinator
    save_id: str
    host_local: bool = False
    timeout: float = SYNC_TIMEOUT
    step: int | None = None
    block_crcs: bool = False
    compression: Compression | None = None
    store: StoreHooks | None = None

    @property
    def leader(self) -> bool:
        """Whether this process commits (process 0, or every process with ``host_local``)."""
        return self.host_local or self.coordinator.process_index == 0

    def broadcast(self, stage: str, value: JSON) -> JSON:
        """Process 0's ``value`` for ``stage`` of this save, on every process."""
        return self.coordinator.broadcast(
            f"save-{self.save_id}.{stage}", value, timeout=self.timeout, step=self.step,
            path=self.where,
        )

    def all_gather(self, stage: str, value: JSON) -> list[JSON]:
        """Every process's ``value`` for ``stage`` of this save."""
        return self.coordinator.all_gather(
            f"save-{self.save_id}.{stage}", value, timeout=self.timeout, step=self.step,
            path=self.where,
        )


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _raise_reports(
    reports: Sequence[JSON], what: str, where: str, step: int | None, me: int | None = None
) -> None:
    """Raises on every process if any process reported an error (``me``: with
    ``host_local``, after the commit, this process's index, whose own copy may be
    committed): :class:`PeerProcessError` naming the failed processes, or
    :class:`CheckpointExistsError` if they all failed because the checkpoint exists."""
    rows = [cast("dict[str, Any]", r) for r in reports]
    failed = [(i, r["error"]) for i, r in enumerate(rows) if r.get("error")]
    if not failed:
        return
    lines = "; ".join(f"process {i}: {text}" for i, text in failed[:8])
    more = f"; and {len(failed) - 8} more" if len(failed) > 8 else ""
    exists = all(rows[i].get("exists") for i, _ in failed)
    outcome = "nothing was committed"
    if me is not None and not rows[me].get("error"):
        outcome = ("this process committed its own copy, but the others named did not, so it "
                   "is no complete checkpoint (restores and managers ignore a step some hosts "
                   "lack); saving it again on every process replaces the partial copies")
    elif me is not None:
        done = [i for i, r in enumerate(rows) if not r.get("error")]
        outcome = "this process committed nothing" + (
            f"; processes {done} committed their own copies, which are no complete checkpoint "
            "and which saving again on every process replaces" if done else "")
    message = (f"the save failed while {what} on {len(failed)} of {len(reports)} processes "
               f"({lines}{more}); {outcome}: fix the cause on the named processes "
               "(their logs have the details) and save again")
    if exists:
        raise CheckpointExistsError(message, path=where, step=step)
    raise PeerProcessError(message, processes=tuple(i for i, _ in failed), path=where,
                           step=step)


def write_distributed(
    job: DistributedSave, *, before_commit: Callable[[], None] | None = None
) -> SaveResult:
    """Writes this process's share of a checkpoint and takes part in its commit.

    Every process of the run must call this for the same checkpoint, in the same order as
    their other saves.

    Args:
      job: This process's part of the save.
      before_commit: Called on every process once its data is durable; if it raises on any
        process, nothing is committed.

    Returns:
      What this process wrote.

    Raises:
      KeepaxError: this or another process failed (the message names them and their errors),
        or a process did not arrive in time; nothing was committed.
      CheckpointExistsError: the checkpoint exists and ``overwrite`` was not given.
    """
    began = time.perf_counter()
    try:
        result = _write_and_commit(job, before_commit)
    except BaseException:
        if job.store is not None:
            job.store.abandoned()
        raise
    return dataclasses.replace(result, seconds=time.perf_counter() - began)


def _write_and_commit(job: DistributedSave, before_commit: Callable[[], None] | None
                      ) -> SaveResult:
    """:func:`write_distributed`'s stages."""
    staging = _agree_on_staging(job)
    try:
        if job.host_local:
            staging = protocol.begin(job.storage, job.name, job.where, replace=job.overwrite)
        files, refs, written = _write_share(job, staging.path, before_commit)
        report: dict[str, JSON] = {"tables": refs}
        if job.store is not None:
            report["store"] = [cast("JSON", n) for n in sorted({f.name for f in files})]
    except Exception as e:  # noqa: BLE001 - reported to every process
        files, written, report = [], 0, {"error": _error_text(e)}
    reports = job.all_gather("written", report)
    try:
        _raise_reports(reports, "writing data", job.where, job.step)
    except KeepaxError:
        if job.leader:
            protocol.discard(staging)
        raise
    outcome: dict[str, JSON] = {}
    if job.leader:
        outcome, nbytes = _commit(job, staging, _table_refs(job, reports))
        written += nbytes
    if job.host_local:
        _raise_reports(job.all_gather("committed", outcome), "committing", job.where, job.step,
                       me=job.coordinator.process_index)
    else:
        shared = job.broadcast("committed", outcome if job.leader else None)
        _raise_reports([shared], "committing on process 0", job.where, job.step)
    if job.store is not None:
        job.store.committed(sorted({str(f) for r in reports
                                    for f in cast("dict[str, Any]", r)["store"]}))
    return SaveResult(job.where, written, len(files), 0.0)


def _agree_on_staging(job: DistributedSave) -> Staging:
    """Where this process writes: process 0 begins the save and tells the others (with
    ``host_local``, each process begins its own save later, reporting failures to all)."""
    storage = job.storage
    if job.host_local:
        return Staging(storage, job.name, job.where, storage.staging_name(job.name),
                       job.overwrite)
    chosen: JSON = None
    if job.coordinator.process_index == 0:
        try:
            chosen = {"staging": protocol.begin(storage, job.name, job.where,
                                                replace=job.overwrite).path}
            if job.store is not None:
                # Every process forgets these before it chooses what to refer to; each has
                # finished its previous save (process 0 committed it), so none can still
                # refer to them once they have heard (docs/FORMAT.md §15).
                chosen["forget"] = list(job.store.announce())
        except Exception as e:  # noqa: BLE001 - reported to every process
            chosen = {"error": _error_text(e)}
    answer = cast("dict[str, Any]", job.broadcast("staging", chosen))
    if "error" in answer:
        raise KeepaxError(f"the save could not start on process 0: {answer['error']}; "
                          "nothing was written: fix the cause and save again",
                          path=job.where, step=job.step)
    if job.store is not None:
        job.store.heard([str(f) for f in answer.get("forget", [])])
    return Staging(storage, job.name, job.where, str(answer["staging"]), job.overwrite)


def _write_share(
    job: DistributedSave, staging: str, before_commit: Callable[[], None] | None
) -> tuple[list[DataFile], list[JSON], int]:
    """Writes this process's data files and chunk tables durably; returns the files, the
    table references to report and the bytes written."""
    me = job.coordinator.process_index
    if job.store is not None:
        files, chunks, written = job.store.write(job.sources)
    else:
        files, chunks = datafiles.write_data_files(
            job.storage, staging, job.sources, prefix=f"p{me:05d}", block_crcs=job.block_crcs,
            compression=job.compression,
        )
        written = sum(f.nbytes for f in files)
    private, shared = tables.split_shared(
        job.cells, job.layouts,
        ((leaf, c) for leaf, pairs in sorted(chunks.items()) for _, c in pairs),
    )
    refs: list[JSON] = []
    for is_shared, entries in ((False, private), (True, shared)):
        if is_shared and not entries:
            continue  # every process has a private table, maybe empty; shared ones if any
        table = tables.encode_table(me, files, entries, save_id=job.save_id)
        table_path = tables.table_name(me, is_shared)
        job.storage.write_bytes(f"{staging}/{table_path}", table)
        written += len(table)
        refs.append([me, table_path, len(table), datafiles.checksum(table), is_shared])
    job.storage.sync_dir(f"{staging}/data")
    if before_commit is not None:
        before_commit()
    return files, refs, written


def _table_refs(job: DistributedSave, reports: Sequence[JSON]) -> list[TableRef]:
    """The chunk tables the manifest lists: every process's (with ``host_local``, this
    process's own)."""
    refs = []
    for report in reports:
        for row in cast("list[list[Any]]", cast("dict[str, Any]", report)["tables"]):
            process, name, nbytes, crc32c, shared = row
            refs.append(TableRef(int(process), str(name), int(nbytes), int(crc32c), bool(shared)))
    if job.host_local:
        refs = [r for r in refs if r.process == job.coordinator.process_index]
    return refs


def _commit(
    job: DistributedSave, staging: Staging, refs: list[TableRef]
) -> tuple[dict[str, JSON], int]:
    """Commits on the leader; returns the outcome to report (empty on success) and the bytes
    written."""
    try:
        return {}, protocol.commit(staging, job.manifest(refs))
    except CheckpointExistsError:
        outcome: dict[str, JSON] = {
            "error": "the checkpoint exists (another save created it first)", "exists": True,
        }
    except Exception as e:  # noqa: BLE001 - reported to every process
        outcome = {"error": _error_text(e)}
    protocol.discard(staging)
    return outcome, 0


# ---------------------------------------------------------------------------------------------
# The agreement before any byte is written.


@dataclasses.dataclass(frozen=True)
class Proposal:
    """What one process means to save, as it joins the agreement (:func:`agree`).

    Attributes:
      where: The checkpoint's path.
      step: The step, if any.
      host_local: Whether every process saves into its own directory.
      error: Why this process's preparation failed (``"Type: message"``), or None.
      structure: A digest of the tree's structure (the same on every process).
      values: Per leaf path, a digest of a value every process must hold alike (the leaves
        that are not global arrays; empty with ``host_local``).
      lengths: Per per-process leaf path, the bytes of this process's copy.
    """

    where: str
    step: int | None
    host_local: bool
    error: str | None = None
    structure: str = ""
    values: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lengths: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, JSON]:
        return {"where": self.where, "step": self.step, "host_local": self.host_local,
                "error": self.error, "structure": self.structure, "values": dict(self.values),
                "lengths": dict(self.lengths)}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What every process agreed on.

    Attributes:
      save_id: The save's id (process 0's choice), the same on every process.
      lengths: Per per-process leaf path, every process's length, by process index.
    """

    save_id: str
    lengths: dict[str, list[int]]


def agree(coordinator: Coordinator, proposal: Proposal, *, timeout: float) -> Agreement:
    """The one collective every process joins before any of them writes a byte of a save.

    Every process calls it once per multi-process save, in the same order (also when its own
    preparation failed: ``proposal.error`` then says why, and every process raises).

    Raises:
      PeerProcessError: On every process alike: some process's preparation failed, the
        processes are not saving the same checkpoint (a process out of step, e.g. one that
        caught a failed save and went on to the next), their trees differ, or a value that is
        not marked per process differs between processes. ``processes`` names them; nothing
        was written.
      KeepaxError: A process did not arrive within ``timeout`` (the message names it).
    """
    mine = proposal.to_json()
    if coordinator.process_index == 0:
        mine["save_id"] = uuid.uuid4().hex
    rows = [cast("dict[str, Any]", r) for r in coordinator.all_gather(
        "agree", mine, timeout=timeout, step=proposal.step, path=proposal.where)]
    _check_agreement(rows, proposal)
    lengths = {name: [int(r["lengths"].get(name, 0)) for r in rows]
               for name in rows[0]["lengths"]}
    return Agreement(str(rows[0]["save_id"]), lengths)


def _check_agreement(rows: Sequence[dict[str, Any]], proposal: Proposal) -> None:
    """Raises the same error on every process unless the rows of every process agree."""
    where, step = proposal.where, proposal.step
    failed = [(i, r["error"]) for i, r in enumerate(rows) if r.get("error")]
    if failed:
        lines = "; ".join(f"process {i}: {text}" for i, text in failed[:8])
        more = f"; and {len(failed) - 8} more" if len(failed) > 8 else ""
        raise PeerProcessError(
            f"the save failed before writing on {len(failed)} of {len(rows)} processes "
            f"({lines}{more}); nothing was written: fix the cause and save again on every "
            "process", processes=tuple(i for i, _ in failed), path=where, step=step)
    first = rows[0]
    odd = [i for i, r in enumerate(rows) if _target(r) != _target(first)]
    if odd:
        seen = "; ".join(f"process {i}: {_describe(rows[i])}" for i in [0, *odd][:8])
        raise PeerProcessError(
            f"the processes are not making the same save ({seen}); nothing was written. Every "
            "process must make the same saves in the same order: a process that caught a failed "
            "save and went on to the next one is out of step with the others; stop the job and "
            "restart it", processes=tuple(odd), path=where, step=step)
    odd = [i for i, r in enumerate(rows) if r["structure"] != first["structure"]]
    if odd:
        raise PeerProcessError(
            f"the trees saved by processes {odd} differ in structure from process 0's; "
            "nothing was written: every process must save the same tree",
            processes=tuple(odd), path=where, step=step)
    for name in sorted(set().union(*(r["values"] for r in rows))):
        digests = [r["values"].get(name) for r in rows]
        differ = tuple(i for i, d in enumerate(digests) if d != digests[0])
        if differ:
            raise PeerProcessError(
                f"this value differs between processes (processes {list(differ)} hold another "
                "value than process 0), and a multi-process save stores one copy of it: mark "
                "it keepax.PerProcess(value) to store each process's own copy, or make it the "
                "same on every process; nothing was written",
                processes=differ, path=where, step=step, leaf=name)


def _target(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a row says is being saved (host-local saves may use other paths per host: only
    their last component must agree)."""
    where = str(row["where"])
    if row["host_local"]:
        where = where.rstrip("/").rsplit("/", 1)[-1]
    return where, row["step"], row["host_local"]


def _describe(row: Mapping[str, Any]) -> str:
    step = "" if row["step"] is None else f" step {row['step']}"
    local = " host-local" if row["host_local"] else ""
    return f"{row['where']}{step}{local}"
