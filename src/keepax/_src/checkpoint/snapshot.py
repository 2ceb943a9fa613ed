"""Save, restore, inspect and verify one checkpoint.

``save``: tree -> (structure, leaves) -> chunks -> data files -> manifest -> commit marker ->
commit (rename into place). ``restore``: commit marker -> manifest (checked against the
marker) -> which leaves and which boxes are needed -> ranged, verified reads -> arrays placed
on the requested shardings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keepax._src.commit import coordination, distributed
from keepax._src.format import boxes as sharding
from keepax._src.format import datafiles as format
from keepax._src.format import dtypes, tables, tree
from keepax._src.format.datafiles import ChunkSource, ReadRequest, RestoreStats
from keepax._src.format.manifest import (
    COMMIT_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TABLES_VERSION,
    ArrayLeaf,
    Chunk,
    CommitMarker,
    DataFile,
    Layout,
    Manifest,
    TableRef,
    ValueLeaf,
)
from keepax._src.io import Storage, is_hidden_name, split_checkpoint_path
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeepaxError,
    NotCommittedError,
    TreeMismatchError,
    UnsupportedLeafError,
)

__all__ = [
    "save",
    "restore",
    "inspect",
    "verify",
    "SaveResult",
    "CheckpointInfo",
    "LeafInfo",
    "RestoreStats",
]

_VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What :func:`save` wrote.

    Attributes:
      path: The checkpoint's path or URL.
      bytes_written: Bytes of data files, manifest and marker.
      files: Number of data files.
      seconds: Wall time of the save.
    """

    path: str
    bytes_written: int
    files: int
    seconds: float


# ---------------------------------------------------------------------------------------------
# Leaves: what a tree's leaves are and how they are stored.


def _is_key_array(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _check_dtype(dtype: np.dtype, path: str) -> None:
    if not dtypes.is_storable(dtype):
        raise UnsupportedLeafError(
            f"arrays of dtype {dtype} cannot be stored (only numeric, bool and JAX's extra "
            "dtypes); convert the leaf, e.g. to str or bytes",
            leaf=path,
        )


def _value_leaf(value: Any, path: str) -> ValueLeaf | None:
    """The manifest entry of a Python scalar or str leaf; None for other leaves."""
    if isinstance(value, np.generic):
        return None  # np.float64 subclasses float, but is stored as an array ("npscalar").
    if isinstance(value, bool):
        return ValueLeaf(path, "bool", value)
    if isinstance(value, int):
        try:
            str(value)  # Python refuses ints above sys.get_int_max_str_digits() digits
        except ValueError as e:
            raise UnsupportedLeafError(
                f"Python int too large to store as JSON ({e}); store it as str or bytes",
                leaf=path,
            ) from e
        return ValueLeaf(path, "int", int(value))
    if isinstance(value, float):
        return ValueLeaf(path, "float", tree.encode_float(float(value)))
    if isinstance(value, complex):
        return ValueLeaf(
            path, "complex", [tree.encode_float(value.real), tree.encode_float(value.imag)]
        )
    if isinstance(value, str):
        return ValueLeaf(path, "str", str(value))
    return None


def _describe_sharding(array: jax.Array) -> dict[str, Any] | None:
    s = array.sharding
    if isinstance(s, jax.sharding.NamedSharding):
        spec = [list(p) if isinstance(p, tuple) else p for p in s.spec]
        return {"kind": "named", "mesh": dict(s.mesh.shape), "spec": spec}
    if len(s.device_set) > 1:
        return {"kind": type(s).__name__, "devices": len(s.device_set)}
    return None


@dataclasses.dataclass
class SourceBuffer:
    """An array that chunks of a leaf are read from: a whole NumPy array, or one shard of a
    ``jax.Array`` (a single-device ``jax.Array``).

    Asynchronous saves copy each buffer the caller could change (``owned`` false) and read
    the chunks from the copy (:func:`chunk_view`).

    Attributes:
      array: The array (``np.ndarray`` or single-device ``jax.Array``).
      chunks: ``(index into LeafPlan.sources, slices)`` of each chunk read from it; ``()``
        slices mean the whole array.
      owned: Whether the plan made this array itself (a private copy nobody else holds).
    """

    array: Any
    chunks: list[tuple[int, tuple[slice, ...]]]
    owned: bool = False

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.array.shape)) * np.dtype(self.array.dtype).itemsize


def chunk_view(array: Any, slices: tuple[slice, ...]) -> np.ndarray:
    """A chunk's values: ``array[slices]`` as NumPy, zero-copy for host and CPU arrays."""
    host = np.asarray(array)
    return host[slices] if slices else host


def _holders(array: jax.Array, shape: tuple[int, ...]) -> dict[Any, set[int]]:
    """Every unique shard (box) of a global array with the processes holding a copy of it."""
    holders: dict[Any, set[int]] = {}
    for device, index in array.sharding.devices_indices_map(shape).items():
        holders.setdefault(sharding.box_from_index(index, shape), set()).add(
            device.process_index
        )
    return holders


def _assigned_shards(
    value: Any, array: Any, path: str, assigner: tables.Assigner, extra: dict[str, Any]
) -> list[tuple[Any, Any]]:
    """The cells this process writes in a multi-process save, as (box, data) pairs."""
    shape = tuple(int(d) for d in array.shape)
    # Host values and process-local arrays (such as a PRNG key made on each process) are taken
    # to be the same on every process: any of them may write it.
    host = not isinstance(array, jax.Array) or array.is_fully_addressable
    everyone = {((0,) * len(shape), shape): range(assigner.process_count)}
    assignment = assigner.leaf(
        shape, np.dtype(array.dtype).itemsize,
        (lambda: everyone) if host else (lambda: _holders(array, shape)),
        key=(None if host else array.sharding, shape),
    )
    if assignment is None:
        raise UnsupportedLeafError(
            f"the shards of this array ({type(value.sharding).__name__}) do not form a regular "
            "grid, which multi-process saves need; reshard it (e.g. with a NamedSharding) "
            "before saving",
            leaf=path,
        )
    extra["cells"] = assignment.ref
    if host:
        return [(box, array[sharding.local_slices(box, ((0,) * len(shape), shape))])
                for box in assignment.mine]
    local = {sharding.box_from_index(s.index, shape): s.data for s in array.addressable_shards}
    return [(box, local[box]) for box in assignment.mine]


def _array_sources(
    index: int, path: str, value: Any, assigner: tables.Assigner | None = None
) -> tuple[str, np.dtype, tuple[int, ...], list[tuple[Any, bool, list[tuple[ChunkSource,
                                                                           tuple[slice, ...]]]]],
           dict[str, Any]]:
    """Classifies an array-like leaf; returns (type, dtype, shape, buffers, extra fields).

    Each buffer is ``(array, owned, [(chunk source, slices into array)])``.
    """
    extra: dict[str, Any] = {}
    owned = False
    if isinstance(value, jax.Array):
        if value.is_deleted():
            raise UnsupportedLeafError(
                "this jax.Array was deleted (or donated) before the save; save before donating",
                leaf=path,
            )
        kind = "jax"
        if _is_key_array(value):
            kind = "prngkey"
            extra["impl"] = str(jax.random.key_impl(value))
            value = jax.random.key_data(value)
        extra["sharding"] = _describe_sharding(value)
        shards = sharding.owned_shards(value)
        array = value
    else:
        if isinstance(value, np.ndarray):
            kind, array = "numpy", value
        elif isinstance(value, np.generic):
            kind, array, owned = "npscalar", np.asarray(value), True
        elif isinstance(value, bytes | bytearray):
            kind, array, owned = "bytes", np.frombuffer(bytes(value), np.uint8), True
        else:
            raise UnsupportedLeafError(
                f"leaves of type {type(value).__module__}.{type(value).__qualname__} cannot be "
                "stored; use arrays, Python/NumPy scalars, str, bytes or None, or register the "
                "type as a pytree node",
                leaf=path,
            )
        shards = [(((0,) * array.ndim, tuple(array.shape)), array)]
    dtype = np.dtype(array.dtype)
    _check_dtype(dtype, path)
    if dtype.byteorder == ">":
        # The format stores little-endian bytes (docs/FORMAT.md); convert big-endian input.
        dtype = dtype.newbyteorder("<")
        array = array.astype(dtype)
        shards = [(shards[0][0], array)]
        owned = True
    if assigner is not None:
        shards = _assigned_shards(value, array, path, assigner, extra)
    shape = tuple(int(d) for d in array.shape)
    name = path or "<root>"
    buffers = []
    whole = ((0,) * len(shape), shape)
    if (
        len(shards) == 1
        and shards[0][0] == whole
        and math.prod(shape) * dtype.itemsize <= format.CHUNK_BYTES
    ):
        # The common case (an unsharded array of modest size): one chunk, no slicing.
        if math.prod(shape):
            data = shards[0][1]
            source = ChunkSource(
                index, name, (0,) * len(shape), shape, dtype, _chunk_getter(data, ())
            )
            buffers.append((data, owned, [(source, ())]))
        return kind, dtype, shape, buffers, extra
    for box, data in shards:
        chunks = []
        for sub in sharding.split_rows(box, dtype.itemsize, format.CHUNK_BYTES):
            if math.prod(sub[1]) == 0:
                continue
            chunk_name = name if sub[1] == shape else f"{name}@{','.join(map(str, sub[0]))}"
            slices = sharding.local_slices(sub, box)
            chunks.append((
                ChunkSource(
                    leaf=index,
                    name=chunk_name,
                    start=sub[0],
                    shape=sub[1],
                    dtype=dtype,
                    data=_chunk_getter(data, slices),
                ),
                slices,
            ))
        if chunks:
            buffers.append((data, owned, chunks))
    return kind, dtype, shape, buffers, extra


def _chunk_getter(data: Any, slices: tuple[slice, ...]) -> Callable[[], np.ndarray]:
    return lambda: chunk_view(data, slices)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """A tree taken apart for saving (shared by :func:`save` and single-file checkpoints).

    Attributes:
      structure: The tree's structure and leaves.
      leaves: Per leaf, its :class:`ValueLeaf`, or None for an array leaf (its chunks are
        known only once written).
      sources: The chunks of every array leaf, in leaf order.
      arrays: Per array leaf index: (type, dtype, shape, extra manifest fields).
      buffers: The arrays the sources read from, in source order.
      layouts: In a multi-process save: the cell layouts the leaves' ``cells`` refer to.
    """

    structure: tree.Structure
    leaves: list[ValueLeaf | None]
    sources: list[ChunkSource]
    arrays: dict[int, tuple[str, np.dtype, tuple[int, ...], dict[str, Any]]]
    buffers: list[SourceBuffer] = dataclasses.field(default_factory=list)
    layouts: list[Layout] = dataclasses.field(default_factory=list)

    def manifest(
        self,
        files: Sequence[DataFile],
        chunks: dict[int, list[tuple[ChunkSource, Chunk]]],
        metadata: dict[str, Any],
        *,
        created: float,
        tables: Sequence[TableRef] = (),
        layouts: Sequence[Layout] = (),
    ) -> Manifest:
        """The manifest, once the chunks are written (``chunks`` as ``write_data_files``
        returns them; or, in a multi-process save, the chunk ``tables`` of every process and
        the cell ``layouts``, with no ``files`` or ``chunks``)."""
        leaves: list[Any] = list(self.leaves)
        for index, (kind, dtype, shape, extra) in self.arrays.items():
            leaves[index] = ArrayLeaf(
                path=tree.keystr(self.structure.paths[index]),
                type=kind,
                shape=shape,
                dtype=dtypes.dtype_name(dtype),
                chunks=tuple(c for _, c in chunks.get(index, [])),
                impl=extra.get("impl"),
                sharding=extra.get("sharding"),
                cells=extra.get("cells"),
            )
        return Manifest(
            version=TABLES_VERSION if tables else FORMAT_VERSION,
            tree=self.structure.node,
            leaves=tuple(leaves),
            files=tuple(files),
            metadata=metadata,
            created=created,
            writer={
                "keepax": _VERSION,
                "jax": jax.__version__,
                "process_count": jax.process_count(),
            },
            tables=tuple(tables),
            layouts=tuple(layouts),
        )


def plan_leaves(tree_: Any, assigner: tables.Assigner | None = None) -> LeafPlan:
    """Describes a tree and classifies its leaves into manifest values and array chunks.

    Args:
      tree_: The pytree.
      assigner: In a multi-process save, decides which cells of each array this process
        writes (its layouts end up in the manifest). None: this process writes everything it
        owns (one replica of each shard).

    Raises:
      UnsupportedLeafError: a leaf (named by key path) cannot be stored.
    """
    structure = tree.describe(tree_)
    leaves: list[ValueLeaf | None] = []
    sources: list[ChunkSource] = []
    buffers: list[SourceBuffer] = []
    arrays: dict[int, tuple[str, np.dtype, tuple[int, ...], dict[str, Any]]] = {}
    for index, (key_path, value) in enumerate(zip(structure.paths, structure.leaves)):
        leaf_path = tree.keystr(key_path)
        value_leaf = _value_leaf(value, leaf_path)
        if value_leaf is not None:
            leaves.append(value_leaf)
            continue
        kind, dtype, shape, leaf_buffers, extra = _array_sources(
            index, leaf_path, value, assigner
        )
        arrays[index] = (kind, dtype, shape, extra)
        for array, owned, chunks in leaf_buffers:
            buffer = SourceBuffer(array, [], owned)
            for source, slices in chunks:
                buffer.chunks.append((len(sources), slices))
                sources.append(source)
            buffers.append(buffer)
        leaves.append(None)
    layouts = list(assigner.layouts) if assigner is not None else []
    return LeafPlan(structure, leaves, sources, arrays, buffers, layouts)


# ---------------------------------------------------------------------------------------------
# Save.


def save(
    path: str,
    tree_: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    host_local: bool = False,
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

    Returns:
      What was written (by this process).

    Raises:
      CheckpointExistsError: ``path`` exists and ``overwrite`` is false.
      UnsupportedLeafError: a leaf (named by key path) cannot be stored.
      KeepaxError: ``metadata`` is not JSON-serialisable; in a multi-process run, a process
        failed or did not arrive in time (the message names it).
    """
    began = time.perf_counter()
    prepared = prepare_save(path, tree_, metadata=metadata, overwrite=overwrite,
                            storage_options=storage_options, host_local=host_local)
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
      serial: The save's number among this process's multi-process saves (every process
        numbers its saves alike), naming its coordination keys.
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
    serial: int = 0
    step: int | None = None
    timeout: float = distributed.SYNC_TIMEOUT


_serials = itertools.count()
SAVE_NAMESPACE = "keepax-save"
"""The coordination namespace of saves (which may run on a writer thread)."""


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
) -> PreparedSave:
    """The checks :func:`save` makes before writing anything, and the tree taken apart.

    Python values and metadata are captured now; arrays are referenced, not copied. In a
    multi-process run every process must prepare the same saves in the same order.

    Raises:
      As :func:`save`, for every error found before writing.
    """
    storage, name = split_checkpoint_path(path, storage_options)
    where = storage.display(name)
    if is_hidden_name(name):
        raise KeepaxError(
            "checkpoint names must not contain '.keepax-' (reserved for staging directories)",
            path=where,
        )
    coordinator = coordination.current(SAVE_NAMESPACE)
    if coordinator.process_count == 1:
        coordinator = None
    # (On object stores, an interrupted save's leftovers are no checkpoint: saved over.)
    if storage.exists(name) and not storage.is_unfinished(name):
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
    metadata = check_metadata(metadata, where)
    if coordinator is None:
        return PreparedSave(storage, name, where, overwrite, metadata, plan_leaves(tree_),
                            step=step)
    assigner = tables.Assigner(
        coordinator.process_index, coordinator.process_count, host_local=host_local
    )
    return PreparedSave(
        storage, name, where, overwrite, metadata, plan_leaves(tree_, assigner),
        coordinator=coordinator, host_local=host_local, serial=next(_serials), step=step,
        timeout=timeout,
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
    if prepared.coordinator is not None:
        return distributed.write_distributed(
            prepared, sources, coordinator=prepared.coordinator, timeout=prepared.timeout,
            step=prepared.step, before_commit=before_commit,
        )
    began = time.perf_counter()
    storage, name, where = prepared.storage, prepared.name, prepared.where
    plan = prepared.plan
    staging = storage.staging_name(name)
    try:
        storage.begin_write(name, replace=prepared.overwrite)
    except FileExistsError as e:
        raise CheckpointExistsError(
            "another save created this checkpoint first; pass overwrite=True to replace it",
            path=where,
        ) from e
    try:
        files, chunks = format.write_data_files(
            storage, staging, plan.sources if sources is None else sources,
            prefix=f"p{jax.process_index():05d}",
        )
        if files:
            storage.sync_dir(f"{staging}/data")
        manifest = plan.manifest(files, chunks, prepared.metadata, created=time.time())
        manifest_bytes = manifest.to_json()
        storage.write_bytes(f"{staging}/{MANIFEST_FILE}", manifest_bytes)
        marker = CommitMarker(
            FORMAT_VERSION, len(manifest_bytes), format.checksum(manifest_bytes), time.time()
        )
        marker_bytes = marker.to_json()
        if before_commit is not None:
            before_commit()
        storage.write_bytes(f"{staging}/{COMMIT_FILE}", marker_bytes)
        try:
            storage.commit(staging, name, replace=prepared.overwrite)
        except FileExistsError as e:
            raise CheckpointExistsError(
                "another save created this checkpoint first; pass overwrite=True to replace it",
                path=where,
            ) from e
    except BaseException:
        if storage.atomic_rename:
            _delete_quietly(storage, staging)
        raise
    written = sum(f.nbytes for f in files) + len(manifest_bytes) + len(marker_bytes)
    return SaveResult(where, written, len(files), time.perf_counter() - began)


def _delete_quietly(storage: Storage, path: str) -> None:
    try:
        storage.delete(path)
    except OSError:
        pass  # A leftover staging directory is invisible to readers (its name is hidden).


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


# ---------------------------------------------------------------------------------------------
# Opening a committed checkpoint.


@dataclasses.dataclass(frozen=True)
class _Opened:
    storage: Storage
    name: str
    where: str
    manifest: Manifest
    key_paths: dict[int, tree.KeyPath]


_MAX_MARKER_BYTES = 64 << 10


def _open(path: str, storage_options: dict[str, Any] | None = None) -> _Opened:
    storage, name = split_checkpoint_path(path, storage_options)
    where = storage.display(name)
    if is_hidden_name(name):
        raise CheckpointNotFoundError(
            "this is keepax's temporary staging (or trash) directory, never a checkpoint",
            path=where,
        )
    if not storage.is_dir(name):
        parent = name.rpartition("/")[0]
        pending = [
            n for n in storage.list(parent) if is_hidden_name(n) and n.startswith(f"{name}.")
        ] if storage.exists(parent) or not parent else []
        hint = " (a save to it started but never finished)" if pending else ""
        kind = "is a file, not a checkpoint directory" if storage.exists(name) else "does not exist"
        raise CheckpointNotFoundError(f"the checkpoint {kind}{hint}", path=where)
    try:
        marker_bytes = _read_small(storage, f"{name}/{COMMIT_FILE}", _MAX_MARKER_BYTES, where)
    except FileNotFoundError:
        entries = storage.list(name)
        if MANIFEST_FILE in entries or "data" in entries:
            raise NotCommittedError(
                f"the save that wrote this checkpoint never finished (no {COMMIT_FILE}); it is "
                "incomplete: delete it, or restore an earlier checkpoint",
                path=where,
            ) from None
        raise CheckpointNotFoundError(
            f"not a keepax checkpoint (no {COMMIT_FILE} or {MANIFEST_FILE})", path=where
        ) from None
    marker = CommitMarker.from_json(marker_bytes, where=where)
    try:
        manifest_bytes = _read_small(
            storage, f"{name}/{MANIFEST_FILE}", marker.manifest_nbytes, where
        )
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{MANIFEST_FILE} is missing from a committed checkpoint", path=where
        ) from None
    if (
        len(manifest_bytes) != marker.manifest_nbytes
        or format.checksum(manifest_bytes) != marker.manifest_crc32c
    ):
        raise CorruptCheckpointError(
            f"{MANIFEST_FILE} does not match its checksum in {COMMIT_FILE} (truncated or "
            "modified); the checkpoint is damaged: restore an earlier one",
            path=where,
        )
    manifest = Manifest.from_json(manifest_bytes, where=where)
    if manifest.version[0] != marker.version[0]:
        raise CorruptCheckpointError(
            f"{COMMIT_FILE} and {MANIFEST_FILE} disagree on the format version", path=where
        )
    key_paths = _check_tree(manifest, where)
    return _Opened(storage, name, where, manifest, key_paths)


def _read_small(storage: Storage, path: str, limit: int, where: str) -> bytes:
    """Reads a whole metadata file, refusing one larger than ``limit`` before reading it."""
    reader = storage.open(path)
    try:
        size = reader.size()
        if size > limit:
            raise CorruptCheckpointError(
                f"{path.rsplit('/', 1)[-1]} has {size} bytes, expected at most {limit}; the "
                "checkpoint is damaged",
                path=where,
            )
        out = bytearray(size)
        n = reader.read_into(0, memoryview(out))
        return bytes(out[:n])
    finally:
        reader.close()


def _check_tree(manifest: Manifest, where: str) -> dict[int, tree.KeyPath]:
    """Checks that every leaf appears in the tree exactly once, at the key path it records;
    returns each leaf's key path."""
    try:
        paths = tree.leaf_paths(manifest.tree)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"invalid tree: {e}", path=where) from None
    if sorted(paths) != list(range(len(manifest.leaves))):
        raise CorruptCheckpointError(
            f"the tree names {len(paths)} leaves, the manifest lists {len(manifest.leaves)}",
            path=where,
        )
    for index, key_path in paths.items():
        if tree.keystr(key_path) != manifest.leaves[index].path:
            raise CorruptCheckpointError(
                f"leaf {index} is recorded as {manifest.leaves[index].path!r} but sits at "
                f"{tree.keystr(key_path)!r} in the tree",
                path=where,
            )
    return paths


# ---------------------------------------------------------------------------------------------
# Restore.


@dataclasses.dataclass(frozen=True)
class _Target:
    """What the caller wants a leaf restored as (from its `like` leaf)."""

    kind: str  # "jax", "numpy", "npscalar", "prngkey", "bytes", or a value type
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    sharding: jax.sharding.Sharding | None = None
    weak_type: bool = False
    committed: bool = True


def _target_of(like_leaf: Any) -> _Target | None:
    x = like_leaf
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
        if _is_key_array(x):
            return _Target("prngkey", tuple(x.shape), None, getattr(x, "sharding", None))
        return _Target(
            "jax",
            tuple(x.shape),
            np.dtype(x.dtype),
            getattr(x, "sharding", None),
            bool(getattr(x, "weak_type", False)),
            # An array made by jnp.asarray is "uncommitted"; jit treats the two differently
            # (it recompiles), so a restore reproduces it. No public API exposes the flag.
            bool(getattr(x, "_committed", True)),
        )
    if isinstance(x, np.ndarray):
        return _Target("numpy", tuple(x.shape), x.dtype)
    if isinstance(x, np.generic):
        return _Target("npscalar", (), np.dtype(x.dtype))
    if isinstance(x, bytes):
        return _Target("bytes")
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("complex", complex),
                        ("str", str)):
        if isinstance(x, types):
            return _Target(kind)
    return None


_ARRAYISH = ("jax", "numpy", "npscalar")


def _resolve_cast(dtype: Any) -> Any:
    if dtype is None or (isinstance(dtype, str) and dtype == "like"):
        return dtype
    return np.dtype(dtypes.dtype_from_name(jnp.dtype(dtype).name))


def _final_dtype(stored: np.dtype, target: _Target | None, cast: Any) -> np.dtype:
    """The dtype a leaf is restored as."""
    if isinstance(cast, np.dtype):
        return cast if jnp.issubdtype(stored, jnp.floating) else stored
    if cast == "like" and target is not None and target.dtype is not None:
        return target.dtype
    return stored


def _check_leaf(leaf: Any, target: _Target | None, cast: Any) -> str | None:
    """Why a stored leaf cannot be restored as the target, or None."""
    if target is None:
        return f"{leaf.path}: like holds an unsupported leaf type"
    if isinstance(leaf, ValueLeaf):
        if target.kind != leaf.type:
            return f"{leaf.path}: checkpoint holds a {leaf.type}, like a {target.kind}"
        return None
    if leaf.type in _ARRAYISH:
        if target.kind not in _ARRAYISH:
            return f"{leaf.path}: checkpoint holds an array, like a {target.kind}"
    elif leaf.type != target.kind:
        return f"{leaf.path}: checkpoint holds {leaf.type}, like a {target.kind}"
    if leaf.type == "prngkey":
        key_shape = leaf.shape[: len(target.shape or ())]
        if tuple(key_shape) != target.shape:
            return f"{leaf.path}: key shape {key_shape} in checkpoint, {target.shape} in like"
        return None
    if target.shape is not None and tuple(leaf.shape) != target.shape:
        return f"{leaf.path}: shape {tuple(leaf.shape)} in checkpoint, {target.shape} in like"
    if target.dtype is not None:
        final = _final_dtype(dtypes.dtype_from_name(leaf.dtype), target, cast)
        if final != target.dtype:
            hint = "pass dtype='like' to cast" if cast is None else "adjust dtype="
            return (
                f"{leaf.path}: dtype {final} from checkpoint, {target.dtype} in like ({hint})"
            )
    return None


def _normalize_select(select: Any) -> list[tuple[Any, ...]] | None:
    if select is None:
        return None
    if isinstance(select, str | tuple):
        select = [select]
    out = []
    for s in select:
        if isinstance(s, str):
            out.append(tuple(p for p in s.split("/") if p))
        elif isinstance(s, tuple | list):
            out.append(tuple(s))
        else:
            raise TypeError(f"select entries must be str or tuples of keys, got {s!r}")
    return out


def restore(
    path: str,
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    stats: RestoreStats | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Restores a checkpoint.

    Args:
      path: The checkpoint's path or URL.
      like: Optional pytree of the same structure, whose leaves are arrays (``jax.Array``,
        ``np.ndarray``), ``jax.ShapeDtypeStruct`` (with or without ``sharding``) or values of
        the expected Python types. Arrays come back as the ``like`` leaf's kind: ``jax.Array``
        placed on its sharding (the default device when it has none), or NumPy. Without
        ``like``, the tree comes back as nested dicts, lists and tuples of NumPy arrays and
        Python values (namedtuples, dataclasses and custom nodes as dicts), on any machine.
      select: Restore only these subtrees: key paths given as ``"params/dense"`` (``str()`` of
        each key) or as tuples of keys. Other leaves' bytes are not read.
      partial: With ``like``, allow the checkpoint to hold leaves ``like`` lacks (they are not
        read). Leaves in ``like`` but not in the checkpoint are always an error.
      dtype: ``None`` (default): dtypes must match ``like`` exactly. ``"like"``: cast each leaf
        to its ``like`` dtype. A dtype: cast every floating-point array to it.
      stats: If given, filled with what was read.
      storage_options: For URLs (``s3://...``): fsspec options and keepax's ``keepax_*``
        transfer options, as for :func:`save`.

    Returns:
      The restored tree.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint is missing, incomplete, damaged or too new.
      TreeMismatchError: ``like`` does not match; the message lists every offending leaf.
    """
    return restore_opened(_open(path, storage_options), like, select, partial, dtype, stats)


def restore_manifest(
    storage: Storage,
    name: str,
    where: str,
    manifest: Manifest,
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    stats: RestoreStats | None = None,
) -> Any:
    """:func:`restore` from a validated manifest whose data files ``storage`` opens under
    ``name`` (how single-file checkpoints share the directory format's reading code).

    Raises:
      CorruptCheckpointError, TreeMismatchError: as :func:`restore`.
    """
    opened = _Opened(storage, name, where, manifest, _check_tree(manifest, where))
    return restore_opened(opened, like, select, partial, dtype, stats)


def restore_opened(
    opened: _Opened,
    like: Any,
    select: str | Sequence[str | tuple[Any, ...]] | None,
    partial: bool,
    dtype: Any,
    stats: RestoreStats | None,
) -> Any:
    """Restores from an opened checkpoint; arguments as for :func:`restore`."""
    manifest = opened.manifest
    cast = _resolve_cast(dtype)
    selectors = _normalize_select(select)
    wanted = set(selected_indices(opened, select))

    targets: dict[int, _Target | None] = {}
    like_order: list[int] = []
    if like is not None:
        like_leaves, like_def = jax.tree_util.tree_flatten_with_path(like)
        by_path = {manifest.leaves[i].path: i for i in wanted}
        problems: list[str] = []
        for like_path, like_leaf in like_leaves:
            text = tree.keystr(like_path)
            index = by_path.get(text)
            if index is None:
                problems.append(f"{text}: in like but not in the checkpoint")
                like_order.append(-1)
                continue
            target = _target_of(like_leaf)
            targets[index] = target
            like_order.append(index)
            problem = _check_leaf(manifest.leaves[index], target, cast)
            if problem:
                problems.append(problem)
        extra = sorted(set(wanted) - set(targets))
        if extra and not partial:
            problems.extend(
                f"{manifest.leaves[i].path}: in the checkpoint but not in like (pass "
                "partial=True to skip such leaves)"
                for i in extra
            )
        if problems:
            shown = "\n  ".join(problems[:25])
            more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
            raise TreeMismatchError(
                f"the checkpoint does not match like ({len(problems)} problem"
                f"{'s' if len(problems) != 1 else ''}):\n  {shown}{more}",
                path=opened.where,
                leaf=problems[0].split(":", 1)[0],
            )
        wanted = set(targets)

    values = _read_leaves(opened, sorted(wanted), targets, cast, stats)
    if like is not None:
        return jax.tree_util.tree_unflatten(like_def, [values[i] for i in like_order])
    keep = None
    if selectors is not None:
        keep = lambda p: any(tree.path_matches(p, s) for s in selectors)  # noqa: E731
    return tree.rebuild_plain(manifest.tree, values.__getitem__, keep=keep)


def selected_indices(
    opened: _Opened, select: str | Sequence[str | tuple[Any, ...]] | None
) -> list[int]:
    """The indices of the leaves ``select`` picks (all when None), in flatten order.

    Raises:
      KeepaxError: ``select`` matches no leaf.
    """
    key_paths = opened.key_paths
    selectors = _normalize_select(select)
    if selectors is None:
        return sorted(key_paths)
    wanted = sorted(
        i for i, p in key_paths.items() if any(tree.path_matches(p, s) for s in selectors)
    )
    if not wanted:
        top = sorted({str(tree._entry_name(p[0])) for p in key_paths.values() if p})
        raise KeepaxError(
            f"select={select!r} matches no leaf; top-level keys are {top}", path=opened.where
        )
    return wanted


def read_plain(opened: _Opened, indices: Sequence[int]) -> dict[int, Any]:
    """Reads the given leaves as NumPy arrays / Python values (no ``like``)."""
    return _read_leaves(opened, indices, {}, None, None)


def _decode_value(leaf: ValueLeaf, where: str) -> Any:
    v, kind = leaf.value, leaf.type
    try:
        if kind == "bool" and isinstance(v, bool):
            return v
        if kind == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "float" and isinstance(v, str):
            return tree.decode_float(v)
        if kind == "complex" and isinstance(v, list) and len(v) == 2:
            return complex(tree.decode_float(v[0]), tree.decode_float(v[1]))
    except (ValueError, TypeError, struct.error):
        pass
    raise CorruptCheckpointError(f"invalid {kind} value {v!r:.60}", path=where, leaf=leaf.path)


def _read_leaves(
    opened: _Opened,
    indices: Sequence[int],
    targets: dict[int, _Target | None],
    cast: Any,
    stats: RestoreStats | None,
) -> dict[int, Any]:
    manifest = opened.manifest
    values: dict[int, Any] = {}
    requests: list[ReadRequest] = []
    finishers: list[tuple[int, ArrayLeaf, _Target | None, dict[Any, Any]]] = []
    boxes_of = {
        index: _target_boxes(manifest.leaves[index], targets.get(index))
        for index in indices
        if isinstance(manifest.leaves[index], ArrayLeaf)
    }
    if manifest.tables:
        manifest, table_bytes = tables.resolve(
            opened.storage, opened.name, opened.where, manifest,
            {i: list(b) for i, b in boxes_of.items()},
        )
        if stats is not None:
            stats.table_bytes_read += table_bytes
    needed_files = {
        c.file
        for i in indices
        if isinstance(manifest.leaves[i], ArrayLeaf)
        for c in manifest.leaves[i].chunks
    }
    format.check_sizes(opened.storage, opened.name, manifest.files, needed_files, opened.where)
    arena = sharding.HostArena()
    for index in indices:
        leaf = manifest.leaves[index]
        target = targets.get(index)
        if isinstance(leaf, ValueLeaf):
            values[index] = _decode_value(leaf, opened.where)
            continue
        stored = dtypes.dtype_from_name(leaf.dtype)
        parts = {}
        for box, devices in boxes_of[index].items():
            out = arena.empty(box[1], stored)
            parts[box] = (devices, out)
            requests.append(ReadRequest(leaf.path, leaf.chunks, box, out))
        finishers.append((index, leaf, target, parts))
    read = format.read_requests(
        opened.storage, opened.name, manifest.files, requests, where=opened.where
    )
    if stats is not None:
        stats.bytes_read += read.bytes_read
        stats.chunks_read += read.chunks_read
        stats.files_opened += read.files_opened
    placer = _Placer()
    pending = [(index, _finish(leaf, target, cast, parts, placer))
               for index, leaf, target, parts in finishers]
    placer.run()
    for index, make in pending:
        values[index] = make()
    return values


def _target_boxes(leaf: ArrayLeaf, target: _Target | None) -> dict[Any, Any]:
    """The boxes of a leaf this process must read, each with its target devices (None: the
    whole array, to one place)."""
    shape = tuple(leaf.shape)
    if (
        target is not None
        and target.kind == "jax"
        and target.sharding is not None
        and target.committed
        and len(target.sharding.device_set) > 1
    ):
        return sharding.target_boxes(target.sharding, shape)
    return {((0,) * len(shape), shape): None}


class _Placer:
    """Collects host-to-device transfers and makes them in one batched ``jax.device_put``
    (per-array calls cost ~100 us each, which dominates restores of many small arrays)."""

    def __init__(self) -> None:
        self._hosts: list[np.ndarray] = []
        self._dests: list[Any] = []
        self._results: list[jax.Array] = []

    def put(self, host: np.ndarray, dest: Any) -> int:
        """Queues a transfer; ``dest`` None means the default device, uncommitted."""
        self._hosts.append(host)
        self._dests.append(dest)
        return len(self._hosts) - 1

    def run(self) -> None:
        results: list[Any] = [None] * len(self._hosts)
        for committed in (True, False):
            picked = [i for i, d in enumerate(self._dests) if (d is not None) == committed]
            if not picked:
                continue
            hosts = [self._hosts[i] for i in picked]
            if committed:
                placed = jax.device_put(hosts, [self._dests[i] for i in picked])
            else:
                placed = jax.device_put(hosts)
            for i, array in zip(picked, placed):
                results[i] = array
        self._results = results

    def get(self, i: int) -> jax.Array:
        return self._results[i]


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if array.dtype == dtype:
        return array
    out = sharding.aligned_empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")
    return out


def _finish(
    leaf: ArrayLeaf, target: _Target | None, cast: Any, parts: dict[Any, Any], placer: _Placer
) -> Callable[[], Any]:
    """Turns the host buffers read for a leaf into the value the caller asked for.

    Device transfers are queued on ``placer``; the returned function, called after
    ``placer.run()``, gives the value.
    """
    stored = dtypes.dtype_from_name(leaf.dtype)
    final = _final_dtype(stored, target, cast)
    if leaf.type == "prngkey":
        ((_, host),) = parts.values()
        try:
            keys = jax.random.wrap_key_data(host, impl=leaf.impl)
        except (ValueError, TypeError) as e:
            raise CorruptCheckpointError(
                f"stored PRNG key data does not fit implementation {leaf.impl!r}: {e}",
                leaf=leaf.path,
            ) from e
        if target is not None and target.sharding is not None:
            keys = jax.device_put(keys, target.sharding)
        return lambda: keys
    if leaf.type == "bytes":
        ((_, host),) = parts.values()
        data = host.tobytes()
        return lambda: data
    kind = target.kind if target is not None else (
        "npscalar" if leaf.type == "npscalar" else "numpy"
    )
    if kind != "jax":
        ((_, host),) = parts.values()
        host = _cast(host, final)
        value = host[()] if kind == "npscalar" else host
        return lambda: value
    make = _place(leaf, target, final, parts, placer)
    if target is not None and target.weak_type:
        return lambda: _weaken(make())
    return make


def _weaken(array: jax.Array) -> jax.Array:
    """Marks an array weakly typed, as its ``like`` leaf was (a Python-scalar-derived value),
    so that a restored state traces exactly like the original and jit does not recompile."""
    from jax._src.lax import lax as lax_internal  # no public API sets weak_type

    return lax_internal._convert_element_type(array, array.dtype, weak_type=True)


def _place(
    leaf: ArrayLeaf, target: _Target | None, final: np.dtype, parts: dict[Any, Any],
    placer: _Placer,
) -> Callable[[], Any]:
    """Queues the host buffers of a leaf for placement on the target's devices."""
    shape = tuple(leaf.shape)
    if target is None or target.sharding is None or not target.committed:
        # Like jnp.asarray, an uncommitted array on the default device (jit may move it).
        ((_, host),) = parts.values()
        i = placer.put(_cast(host, final), None)
        return lambda: placer.get(i)
    if len(parts) == 1 and len(target.sharding.device_set) == 1:
        ((_, host),) = parts.values()
        i = placer.put(_cast(host, final), target.sharding)
        return lambda: placer.get(i)
    slots = []
    for devices, host in parts.values():
        host = _cast(host, final)
        slots.extend(placer.put(host, d) for d in devices)
    return lambda: jax.make_array_from_single_device_arrays(
        shape, target.sharding, [placer.get(i) for i in slots]
    )


# ---------------------------------------------------------------------------------------------
# Inspect and verify.


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One leaf of a checkpoint, as :func:`inspect` describes it.

    Attributes:
      path: Key path (``jax.tree_util.keystr``).
      type: ``jax``, ``numpy``, ``npscalar``, ``bytes``, ``prngkey``, ``int``, ``float``,
        ``bool``, ``complex`` or ``str``.
      shape: Array shape (None for Python values).
      dtype: Dtype name (None for Python values).
      nbytes: Bytes stored in data files.
      chunks: Number of chunks.
      value: For Python values, the value itself; else None.
      sharding: The saved sharding, if the leaf was a sharded ``jax.Array``.
    """

    path: str
    type: str
    shape: tuple[int, ...] | None
    dtype: str | None
    nbytes: int
    chunks: int
    value: Any = None
    sharding: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect` tells about a checkpoint, without reading array data.

    Attributes:
      path: The checkpoint's path or URL.
      format_version: ``"MAJOR.MINOR"``.
      created: Unix time the manifest was written.
      metadata: The user metadata given to ``save``.
      leaves: Every leaf, in flatten order.
      tree: The structure as plain dicts/lists/tuples with :class:`LeafInfo` at the leaves.
      files: (name, size in bytes) of each data file (with per-process chunk tables: of each
        table, which inspect does not read).
      writer: Versions and process count of the writer.
    """

    path: str
    format_version: str
    created: float
    metadata: dict[str, Any]
    leaves: tuple[LeafInfo, ...]
    tree: Any
    files: tuple[tuple[str, int], ...]
    writer: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Total bytes of array data."""
        return sum(leaf.nbytes for leaf in self.leaves)


def inspect(path: str, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """Describes a committed checkpoint (structure, shapes, dtypes, sizes, metadata) without
    reading any array data.

    ``storage_options`` are as for :func:`save` (URLs such as ``s3://...`` only).

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError.
    """
    return info_of(_open(path, storage_options))


def info_of(opened: _Opened) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of an opened checkpoint (no array data read)."""
    m = opened.manifest
    infos = []
    for leaf in m.leaves:
        if isinstance(leaf, ArrayLeaf):
            infos.append(
                LeafInfo(leaf.path, leaf.type, tuple(leaf.shape), leaf.dtype, leaf.nbytes,
                         _chunk_count(m, leaf), None, leaf.sharding)
            )
        else:
            infos.append(
                LeafInfo(leaf.path, leaf.type, None, None, 0, 0,
                         _decode_value(leaf, opened.where))
            )
    return CheckpointInfo(
        path=opened.where,
        format_version=f"{m.version[0]}.{m.version[1]}",
        created=m.created,
        metadata=m.metadata,
        leaves=tuple(infos),
        tree=tree.rebuild_plain(m.tree, infos.__getitem__),
        files=tuple((f.name, f.nbytes) for f in m.files)
        + tuple((t.name, t.nbytes) for t in m.tables),
        writer=m.writer,
    )


def _chunk_count(manifest: Manifest, leaf: ArrayLeaf) -> int:
    """Chunks of a leaf; with chunk tables (not read by ``inspect``), its non-empty cells."""
    if leaf.cells is None:
        return len(leaf.chunks)
    writers = manifest.layouts[leaf.cells.layout].writers
    return sum(1 for w in writers if w) if math.prod(leaf.shape) else 0


def verify(
    path: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Re-reads every chunk of a checkpoint and checks its checksum.

    Args:
      path: The checkpoint's path or URL.
      progress: Called with (bytes checked so far, total bytes) as the check advances.
      storage_options: As for :func:`save` (URLs such as ``s3://...`` only).

    Returns:
      One message per problem found (empty when the checkpoint is sound). Each names the
      data file, the byte range and the leaf.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint cannot be opened at all.
    """
    return verify_opened(_open(path, storage_options), progress=progress)


def resolved_manifest(opened: _Opened) -> Manifest:
    """The manifest with every leaf's chunks listed (per-process chunk tables read in).

    Raises:
      CorruptCheckpointError: a chunk table is missing or damaged.
    """
    m = opened.manifest
    if not m.tables:
        return m
    whole = {
        i: [((0,) * len(leaf.shape), tuple(leaf.shape))]
        for i, leaf in enumerate(m.leaves)
        if isinstance(leaf, ArrayLeaf)
    }
    m, _ = tables.resolve(opened.storage, opened.name, opened.where, m, whole)
    return m


def verify_opened(
    opened: _Opened, *, progress: Callable[[int, int], None] | None = None
) -> list[str]:
    """:func:`verify` of an opened checkpoint."""
    try:
        m = resolved_manifest(opened)
    except KeepaxError as e:
        return [str(e)]
    pieces = [
        (leaf.path, c) for leaf in m.leaves if isinstance(leaf, ArrayLeaf) for c in leaf.chunks
    ]
    return format.verify_chunks(
        opened.storage, opened.name, m.files, pieces, where=opened.where, progress=progress
    )
