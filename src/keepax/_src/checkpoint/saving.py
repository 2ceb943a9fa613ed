"""Saving one checkpoint: check the inputs and take the tree apart (:func:`prepare_save`),
then write the data files and commit (:func:`write_prepared`) through the commit layer's one
protocol (:mod:`keepax._src.commit.protocol`), alone or with the other processes of a
multi-process run (:mod:`keepax._src.commit.distributed`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint import casting, incremental, per_process, stateful
from keepax._src.checkpoint.plan import LeafPlan, ProcessRows, is_key_array, plan_leaves
from keepax._src.commit import coordination, distributed, protocol
from keepax._src.commit.protocol import SaveResult
from keepax._src.format import codecs, tables
from keepax._src.format import datafiles as format
from keepax._src.format.codecs import Compression
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import COMMIT_FILE, MANIFEST_FILE
from keepax._src.io import Storage, is_hidden_name, split_checkpoint_path
from keepax._src.util import gc_paused
from keepax.errors import CheckpointExistsError, KeepaxError

SYNC_TIMEOUT = distributed.SYNC_TIMEOUT
"""Default seconds a process waits for the others at each stage of a multi-process save."""

__all__ = [
    "PreparedSave", "SAVE_NAMESPACE", "SYNC_TIMEOUT", "SaveResult", "check_metadata",
    "prepare_save", "save", "write_prepared",
]

# Threads making a save's data files (at most 4) and their directory durable at once.
_SYNC_THREADS = 5


@gc_paused()
def save(
    path: str,
    tree_: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    host_local: bool = False,
    timeout: float = distributed.SYNC_TIMEOUT,
    compression: str | tuple[str, int] | None = None,
    dtype: Any = None,
) -> SaveResult:
    """Saves a pytree as a checkpoint, durably and atomically.

    In a multi-process (``jax.distributed``) run every process calls ``save`` with the same
    path and tree: each writes only the shards assigned to it (one copy of each unique shard,
    the work of replicated ones spread over their holders), and process 0 commits once every
    process has reported its data durable; a failure on any process fails the save on all.

    Data files are written and fsynced into a hidden staging directory beside ``path``, then
    the manifest and the commit marker, then the directory is renamed into place. A crash at
    any point leaves either no checkpoint at ``path`` or a complete one (and never damages an
    existing one).

    Args:
      path: Directory to create (local path or ``memory://store/name``).
      tree_: Any pytree of ``jax.Array`` (sharded or not), NumPy arrays and scalars, Python
        ``int``/``float``/``bool``/``complex``/``str``/``bytes``, ``None`` and typed PRNG keys,
        in dicts, lists, tuples, namedtuples, dataclasses and registered pytree nodes.
      metadata: JSON-serialisable user metadata stored in the manifest.
      overwrite: Replace an existing checkpoint at ``path`` (atomically: if this save fails,
        the old one is intact; on object stores the old one is deleted first).
      storage_options: For URLs such as ``s3://bucket/ckpt``: fsspec/s3fs options (e.g.
        ``{"client_kwargs": {"endpoint_url": ...}}``) and keepax's ``keepax_*`` transfer
        options (README, *Object storage*).
      host_local: In a multi-process run, every process saves into its own ``path`` (a local
        disk per host): each writes every shard it holds and commits its own copy, which
        restores onto the same processes and mesh.
      timeout: In a multi-process run, seconds each process waits for the others at each
        stage of the save (the agreement it begins with, the data written, the commit).
      compression: ``"zstd"`` (level 1) or ``("zstd", level)`` (-7 to 22) compresses each
        chunk, in parallel across cores, keeping it raw where that does not make it smaller
        (needs the ``zstandard`` package: ``pip install 'keepax[zstd]'``; so does reading the
        checkpoint). None (the default): chunks are stored as they are.
      dtype: Store each floating-point array (``jax.Array`` or NumPy, on its sharding) as
        this floating-point dtype, e.g. ``jnp.bfloat16``; integers, Python values and
        ``get_state()`` states are stored as they are, and the caller's tree is not changed.

    Returns:
      What was written (by this process).

    Raises:
      CheckpointExistsError: ``path`` exists and ``overwrite`` is false.
      UnsupportedLeafError: a leaf (named by key path) cannot be stored.
      KeepaxError: ``metadata`` is not JSON-serialisable; ``compression`` is not one of the
        values above or ``zstandard`` is missing; ``dtype`` is not a floating-point dtype;
        in a multi-process run, a process failed or did not arrive in time (the message
        names it).
      PeerProcessError: In a multi-process run, on every process, before anything is
        written: a process's checks failed, the processes are not making the same save, or a
        value that is not marked :class:`keepax.PerProcess` differs between them.
    """
    began = time.perf_counter()
    prepared = prepare_save(path, tree_, metadata=metadata, overwrite=overwrite,
                            storage_options=storage_options, host_local=host_local,
                            timeout=timeout, compression=compression, dtype=dtype)
    result = write_prepared(prepared)
    return dataclasses.replace(result, seconds=time.perf_counter() - began)


@dataclasses.dataclass(frozen=True)
class PreparedSave:
    """A save whose inputs are checked and whose tree is taken apart (:func:`prepare_save`),
    ready to be written (:func:`write_prepared`), now or on a background thread.

    Attributes:
      storage: Where the checkpoint goes.
      name: Its name in ``storage``.
      where: Its path for messages.
      overwrite: Whether it replaces an existing checkpoint.
      metadata: The user metadata, checked (a JSON round-tripped copy).
      plan: The tree's leaves: Python values captured, array chunks still to read.
      coordinator: In a multi-process run, how this process meets the others (None: alone).
      host_local: Every process saves into its own directory (see :func:`save`).
      save_id: In a multi-process save, the id every process agreed on (names its
        collectives; written into every chunk table).
      step: The step, for messages.
      timeout: Seconds to wait for other processes at each stage of a multi-process save.
    """

    storage: Storage
    name: str
    where: str
    overwrite: bool
    metadata: dict[str, Any]
    plan: LeafPlan
    coordinator: coordination.Coordinator | None = None
    host_local: bool = False
    save_id: str = ""
    step: int | None = None
    timeout: float = distributed.SYNC_TIMEOUT
    compression: Compression | None = None
    """How chunks are compressed (None: stored as they are)."""
    store: Any = None
    """An incremental save's :class:`~keepax._src.checkpoint.incremental.ChunkStore` (a
    manager's; not with ``host_local``); None writes every chunk into the checkpoint."""


SAVE_NAMESPACE = "keepax-save"
"""The coordination namespace of saves' writes and commits (which may run on a writer
thread)."""
AGREE_NAMESPACE = "keepax-agree"
"""The coordination namespace of the agreement each save begins with (always made in the
caller's thread, when the save is prepared)."""


@gc_paused()
def prepare_save(
    path: str,
    tree_: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    host_local: bool = False,
    step: int | None = None,
    timeout: float = distributed.SYNC_TIMEOUT,
    storage_options: dict[str, Any] | None = None,
    compression: str | tuple[str, int] | None = None,
    dtype: Any = None,
) -> PreparedSave:
    """The checks :func:`save` makes before writing anything, and the tree taken apart.

    Python values and metadata are captured now; arrays are referenced, not copied. In a
    multi-process run every process must prepare the same saves in the same order: each
    preparation ends in the save's agreement (:func:`distributed.agree`), which every process
    joins even when its own checks failed, so that a failure anywhere fails the save
    everywhere before anything is written.

    Raises:
      As :func:`save`, for every error found before writing; in a multi-process run,
      :class:`~keepax.errors.PeerProcessError` on every process when any process's checks
      failed or the processes disagree on what they save.
    """
    _check_timeout(timeout)
    compressing = codecs.parse_compression(compression)
    if dtype is not None:  # before objects give their states: those are stored as they are
        tree_ = casting.cast_floating(tree_, dtype, is_leaf=stateful.is_stateful)
    coordinator: coordination.Coordinator | None = coordination.current(SAVE_NAMESPACE)
    if coordinator is not None and coordinator.process_count == 1:
        coordinator = None
    if coordinator is None:
        storage, name, where, checked = _check_inputs(path, metadata, overwrite, storage_options)
        if stateful.has_objects(tree_, also=per_process.PerProcess):  # (else: nothing to do)
            tree_, _ = stateful.state_tree(tree_, step)
            tree_, _ = per_process.take_apart(tree_, 0, 1)
        return PreparedSave(storage, name, where, overwrite, checked, plan_leaves(tree_),
                            step=step, compression=compressing)
    where = str(path)
    failure: Exception | None = None
    me, count = coordinator.process_index, coordinator.process_count
    try:
        storage, name, where, checked = _check_inputs(path, metadata, overwrite, storage_options)
        tree_, _ = stateful.state_tree(tree_, step)
        tree_, copies = per_process.take_apart(tree_, me, count)
        plan = plan_leaves(tree_, tables.Assigner(me, count, host_local=host_local))
        proposal = _proposal(plan, where, step, host_local, copies)
    except Exception as e:  # noqa: BLE001 - every process learns of it in the agreement
        failure = e
        proposal = distributed.Proposal(where, step, host_local, error=_error_text(e))
    try:
        agreement = distributed.agree(coordination.current(AGREE_NAMESPACE), proposal,
                                      timeout=timeout)
    except KeepaxError as e:
        raise e from failure
    if copies:  # every row as wide as the longest copy: planned again with the agreed widths
        widths = {leaf: max(lengths) for leaf, lengths in agreement.lengths.items()}
        tree_ = per_process.widen(tree_, widths)
        plan = plan_leaves(tree_, tables.Assigner(me, count, host_local=host_local))
    return PreparedSave(
        storage, name, where, overwrite, checked, plan, coordinator=coordinator,
        host_local=host_local, save_id=agreement.save_id, step=step, timeout=timeout,
        compression=compressing,
    )


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        0 < timeout < math.inf
    ):
        raise KeepaxError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def _check_inputs(
    path: str, metadata: Any, overwrite: bool, storage_options: dict[str, Any] | None
) -> tuple[Storage, str, str, dict[str, Any]]:
    """The storage, name and display path of a new checkpoint and its checked metadata.

    Raises:
      CheckpointExistsError, KeepaxError: as :func:`save`.
    """
    storage, name = split_checkpoint_path(path, storage_options)
    where = storage.display(name)
    if is_hidden_name(name):
        raise KeepaxError(
            "checkpoint names must not contain '.keepax-' (reserved for staging directories)",
            path=where,
        )
    # (On object stores, an interrupted save's leftovers are no checkpoint: saved over.)
    if storage.exists(name) and not protocol.is_unfinished(storage, name):
        if not overwrite:
            raise CheckpointExistsError(
                "a checkpoint (or file) already exists here; pass overwrite=True to replace it",
                path=where,
            )
        if not (
            storage.exists(f"{name}/{COMMIT_FILE}") or storage.exists(f"{name}/{MANIFEST_FILE}")
        ):
            raise CheckpointExistsError(
                "overwrite=True replaces keepax checkpoints only, and this path holds something "
                "else; remove it yourself or choose another path",
                path=where,
            )
    return storage, name, where, check_metadata(metadata, where)


def _proposal(
    plan: LeafPlan, where: str, step: int | None, host_local: bool, copies: dict[str, bytes]
) -> distributed.Proposal:
    """What this process saves, as it tells the others: digests of the tree's structure and
    (in a shared-directory save) of every value that is not part of a global array."""
    structure = json.dumps(plan.structure.node, sort_keys=True, default=str).encode()
    values: dict[str, str] = {}
    if not host_local:
        for index, leaf in enumerate(plan.leaves):
            if leaf is not None:
                text = json.dumps([leaf.type, leaf.value], sort_keys=True, allow_nan=True)
                values[leaf.path] = f"{format.checksum(text.encode()):08x}"
                continue
            value = plan.structure.leaves[index]
            if isinstance(value, ProcessRows) or (
                isinstance(value, jax.Array) and not value.is_fully_addressable
            ):
                continue  # per process, or a global array: each process writes its own part
            array = np.ascontiguousarray(np.asarray(
                jax.random.key_data(value) if is_key_array(value) else value))
            head = f"{array.dtype.str}{array.shape}".encode()
            crc = format.checksum(array.reshape(-1).view(np.uint8).data, format.checksum(head))
            values[plan.structure.names[index]] = f"{crc:08x}"
    return distributed.Proposal(
        where, step, host_local, structure=f"{format.checksum(structure):08x}", values=values,
        lengths={leaf: len(data) for leaf, data in copies.items()},
    )


def write_prepared(
    prepared: PreparedSave,
    sources: Sequence[ChunkSource] | None = None,
    *,
    before_commit: Callable[[], None] | None = None,
) -> SaveResult:
    """Writes a prepared save and commits it (the part of :func:`save` that does I/O).

    Args:
      prepared: What :func:`prepare_save` returned.
      sources: The chunks to write, in place of ``prepared.plan.sources`` (the same chunks,
        read from staged copies).
      before_commit: Called before the commit marker is written; if it raises, nothing is
        committed.

    Raises:
      CheckpointExistsError: Another save created the checkpoint first.
      OSError: The storage failed; nothing was committed.
    """
    plan = prepared.plan
    chosen = plan.sources if sources is None else sources
    if prepared.coordinator is not None:
        job = _distributed_job(prepared, prepared.coordinator, chosen)
        if prepared.store is not None:  # incremental: each process dedups what it writes
            job = dataclasses.replace(job, store=incremental.SharedSave(
                prepared, prepared.store, prepared.coordinator.process_index,
                consume=sources is not None))
        return distributed.write_distributed(job, before_commit=before_commit)
    if prepared.store is not None:
        return incremental.write_incremental(prepared, chosen, prepared.store,
                                             before_commit=before_commit,
                                             consume=sources is not None)
    began = time.perf_counter()
    storage = prepared.storage
    with protocol.staged(
        storage, prepared.name, prepared.where, replace=prepared.overwrite
    ) as staging:
        # The data files and their directory are made durable on other threads while this
        # one builds the manifest (fsync waits for the disk, not the CPU); all of it is
        # durable before the commit (the pool's exit waits even if the manifest fails).
        with concurrent.futures.ThreadPoolExecutor(_SYNC_THREADS) as syncer:
            synced: list[concurrent.futures.Future[None]] = []
            files, chunks = format.write_data_files(
                storage, staging.path, chosen, prefix=f"p{jax.process_index():05d}",
                compression=prepared.compression,
                closer=lambda writer: synced.append(syncer.submit(writer.close)),
            )
            if files:
                synced.append(syncer.submit(storage.sync_dir, f"{staging.path}/data"))
            manifest = plan.manifest(files, chunks, prepared.metadata, created=time.time(),
                                     codecs=prepared.compression is not None)
            for future in synced:
                future.result()
        written = protocol.commit(staging, manifest, before_commit=before_commit)
    written += sum(f.nbytes for f in files)
    return SaveResult(prepared.where, written, len(files), time.perf_counter() - began)


def _distributed_job(
    prepared: PreparedSave, coordinator: coordination.Coordinator,
    sources: Sequence[ChunkSource],
) -> distributed.DistributedSave:
    """This process's part of a multi-process save, as the commit layer takes it."""
    plan = prepared.plan
    return distributed.DistributedSave(
        storage=prepared.storage,
        name=prepared.name,
        where=prepared.where,
        overwrite=prepared.overwrite,
        sources=sources,
        cells={i: extra["cells"] for i, (_, _, _, extra) in plan.arrays.items()},
        layouts=plan.layouts,
        manifest=lambda refs: plan.manifest(
            (), {}, prepared.metadata, created=time.time(), tables=refs, layouts=plan.layouts,
            # Store references, like block checksums, are format 1.2 members of the tables.
            block_crcs=(not prepared.host_local and plan.block_crcs) or prepared.store is not None,
            codecs=prepared.compression is not None,
        ),
        coordinator=coordinator,
        save_id=prepared.save_id,
        host_local=prepared.host_local,
        timeout=prepared.timeout,
        step=prepared.step,
        block_crcs=not prepared.host_local and plan.block_crcs,
        compression=prepared.compression,
    )


def check_metadata(metadata: Any, where: str, step: int | None = None) -> dict[str, Any]:
    """Checks user metadata (a JSON-able dict) and returns a JSON round-tripped copy.

    Raises:
      KeepaxError: naming the checkpoint (and step) and saying how to fix the metadata.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise KeepaxError(f"metadata must be a dict, got {type(metadata).__name__}",
                          path=where, step=step)
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise KeepaxError(
            f"metadata is not JSON-serialisable ({e}); convert arrays with .tolist() and "
            "non-finite floats to strings",
            path=where, step=step,
        ) from e

