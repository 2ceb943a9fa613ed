"""Planning a save: what a tree's leaves are, how each is stored, and which chunks this
process writes.

A tree is taken apart into Python values (stored in the manifest) and array leaves, whose
bytes are cut into chunks of at most ``CHUNK_BYTES``, each read from a :class:`SourceBuffer`
(a whole array or one shard). In a multi-process save a ``tables.Assigner`` decides which
process writes each cell of each array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.format import blocks, dtypes, tables, tree
from keepax._src.format import boxes as sharding
from keepax._src.format import datafiles as format
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import (
    CODECS_VERSION,
    FORMAT_VERSION,
    SHUFFLE_VERSION,
    TABLES_VERSION,
    Chunk,
    DataFile,
    Layout,
    Manifest,
    TableRef,
    ValueLeaf,
    array_leaf,
)
from keepax._src.util import gc_paused
from keepax.errors import UnsupportedLeafError

__all__ = ["LeafPlan", "ProcessRows", "SourceBuffer", "chunk_view", "is_key_array",
           "plan_leaves"]

_VERSION = "0.1.0"


def is_key_array(x: Any) -> bool:
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


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """This process's row of a ``(count, width)`` ``uint8`` array in which each process
    writes its own row: how a :class:`keepax.PerProcess` value is stored (type
    ``perprocess``; see ``per_process.py``).

    Attributes:
      row: This process's bytes (``width`` of them, zero-padded).
      process: This process's index.
      count: How many processes save.
      width: The row width every process agreed on.
    """

    row: np.ndarray
    process: int
    count: int
    width: int

    @property
    def box(self) -> Any:
        """This process's row, as a box of the whole array."""
        return ((self.process, 0), (1, self.width))

    def holders(self) -> dict[Any, set[int]]:
        """Every row with the one process holding it."""
        return {((i, 0), (1, self.width)): {i} for i in range(self.count)}


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
    devices: Mapping[jax.Device, Any] = array.sharding.devices_indices_map(shape)
    for device, index in devices.items():
        holders.setdefault(sharding.box_from_index(index, shape), set()).add(
            device.process_index
        )
    return holders


def _assigned_shards(
    value: Any, array: Any, path: str, assigner: tables.Assigner, extra: dict[str, Any]
) -> list[tuple[Any, Any]]:
    """The cells this process writes in a multi-process save, as (box, data) pairs."""
    shape = tuple(int(d) for d in array.shape)
    if isinstance(value, ProcessRows):
        rows = assigner.leaf(shape, 1, value.holders, key=("perprocess", shape))
        assert rows is not None  # rows always form a grid
        extra["cells"] = rows.ref
        return [(box, value.row[None]) for box in rows.mine]
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


_Chunks = list[tuple[ChunkSource, tuple[slice, ...]]]
"""The chunks read from one buffer: each chunk's source and its slices into the buffer."""


def _array_sources(
    index: int, path: str, value: Any, assigner: tables.Assigner | None = None
) -> tuple[str, np.dtype, tuple[int, ...], list[tuple[Any, bool, _Chunks]], dict[str, Any]]:
    """Classifies an array-like leaf; returns (type, dtype, shape, buffers, extra fields).

    Each buffer is ``(array, owned, chunks)``.
    """
    extra: dict[str, Any] = {}
    kind, array, owned, shards = _classify(value, path, extra)
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
    return kind, dtype, shape, _buffers(index, path or "<root>", dtype, shape, shards, owned), extra


def _classify(
    value: Any, path: str, extra: dict[str, Any]
) -> tuple[str, Any, bool, list[tuple[Any, Any]]]:
    """An array-like leaf's type, the array its bytes come from, whether the plan made that
    array itself, and its shards as (box, data) pairs; adds manifest fields to ``extra``."""
    if isinstance(value, jax.Array):
        if value.is_deleted():
            raise UnsupportedLeafError(
                "this jax.Array was deleted (or donated) before the save; save before donating",
                leaf=path,
            )
        kind = "jax"
        if is_key_array(value):
            kind = "prngkey"
            extra["impl"] = str(jax.random.key_impl(value))
            value = jax.random.key_data(value)
        extra["sharding"] = _describe_sharding(value)
        return kind, value, False, sharding.owned_shards(value)
    if isinstance(value, ProcessRows):
        # Alone, the whole array is this row; with others, its shape (only: the rows of other
        # processes are theirs) and this process's row (see _assigned_shards).
        whole = value.row[None] if value.count == 1 else np.broadcast_to(
            value.row, (value.count, value.width))
        return "perprocess", whole, False, [(((0, 0), whole.shape), whole)]
    if isinstance(value, np.ndarray):
        kind, array, owned = "numpy", value, False
    elif isinstance(value, np.generic):
        kind, array, owned = "npscalar", np.asarray(value), True
    elif isinstance(value, bytes | bytearray):
        kind, array, owned = "bytes", np.frombuffer(bytes(value), np.uint8), True
    else:
        raise UnsupportedLeafError(_unsupported_message(value), leaf=path)
    return kind, array, owned, [(((0,) * array.ndim, tuple(array.shape)), array)]


def _buffers(
    index: int, name: str, dtype: np.dtype, shape: tuple[int, ...],
    shards: list[tuple[Any, Any]], owned: bool,
) -> list[tuple[Any, bool, _Chunks]]:
    """The buffers of an array leaf, each with the chunks (of at most ``CHUNK_BYTES``) read
    from it."""
    buffers: list[tuple[Any, bool, _Chunks]] = []
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
        return buffers
    for box, data in shards:
        chunks: _Chunks = []
        for sub in sharding.split_rows(box, dtype.itemsize, format.CHUNK_BYTES):
            if math.prod(sub[1]) == 0:
                continue
            chunk_name = format.tensor_name(name, sub[0], sub[1], shape)
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
    return buffers


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

    @property
    def block_crcs(self) -> bool:
        """Whether a multi-process save of this plan checksums chunks block by block: when
        some whole cell is large enough to get block checksums
        (:func:`blocks.crc32c_block_size`). The same on every process (cells are global),
        so process 0 writes the manifest's version without seeing the others' tables."""
        for _, dtype, _, extra in self.arrays.values():
            cells = extra.get("cells")
            if cells is not None and blocks.crc32c_block_size(cells.block, dtype.itemsize):
                return True
        return False

    @gc_paused()
    def manifest(
        self,
        files: Sequence[DataFile],
        chunks: dict[int, list[tuple[ChunkSource, Chunk]]],
        metadata: dict[str, Any],
        *,
        created: float,
        tables: Sequence[TableRef] = (),
        layouts: Sequence[Layout] = (),
        block_crcs: bool = False,
        codecs: bool = False,
    ) -> Manifest:
        """The manifest, once the chunks are written (``chunks`` as ``write_data_files``
        returns them; or, in a multi-process save, the chunk ``tables`` of every process and
        the cell ``layouts``, with no ``files`` or ``chunks``). ``block_crcs``: the tables
        carry block checksums, a format 1.2 member. ``codecs``: the chunks may use codecs (a
        compressed save): the manifest is of version 1.2 if a chunk does (with ``tables``,
        whose chunks process 0 does not see: always, of version 1.3 as a chunk may use
        ``zstd-shuffle``)."""
        leaves: list[Any] = list(self.leaves)
        names: dict[np.dtype, str] = {}
        paths = self.structure.names
        for index, (kind, dtype, shape, extra) in self.arrays.items():
            name = names.get(dtype)
            if name is None:
                name = names[dtype] = dtypes.dtype_name(dtype)
            pairs = chunks.get(index, ())
            leaves[index] = array_leaf(
                paths[index], kind, shape, name,
                (pairs[0][1],) if len(pairs) == 1 else tuple(c for _, c in pairs),
                extra.get("impl"), extra.get("sharding"), extra.get("cells"),
            )
        return Manifest(
            version=max(
                (c.min_version for pairs in chunks.values() for _, c in pairs
                 if c.codec != "raw" or c.stored_nbytes is not None or c.digest is not None
                 or c.crc32c_block),  # (c.uses_codecs, inline: a plain chunk needs 1.0)
                default=FORMAT_VERSION,
            ) if not tables else SHUFFLE_VERSION if codecs
            else CODECS_VERSION if block_crcs else TABLES_VERSION,
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


class _Plain:
    """Plans the common leaf fast: a ``jax.Array`` on one device or an ``np.ndarray``, of a
    plain (little-endian, storable, non-key) dtype, in one chunk. What :func:`_array_sources`
    would make of it, with its per-leaf checks done once per sharding and per dtype and
    shape."""

    def __init__(self) -> None:
        self._shapes: dict[Any, tuple[int, tuple[int, ...], tuple[int, ...]] | None] = {}
        self._shardings: dict[Any, bool] = {}

    def _shape(self, dtype: Any, shape: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        """(bytes, chunk start, shape) of a leaf of this dtype and shape, or None when it is
        not a common one (an unusual dtype, empty, or too large for one chunk)."""
        key = (dtype, shape)
        try:
            return self._shapes[key]
        except KeyError:
            pass
        ok = (isinstance(dtype, np.dtype) and dtypes.is_storable(dtype)
              and dtype.byteorder != ">" and not is_key_array(np.empty(0, dtype)))
        nbytes = math.prod(shape) * dtype.itemsize if ok else 0
        shape = tuple(shape)
        found = self._shapes[key] = (
            (nbytes, (0,) * len(shape), shape) if 0 < nbytes <= format.CHUNK_BYTES else None)
        return found

    def add(
        self, index: int, path: str, value: Any,
        arrays: dict[int, tuple[str, np.dtype, tuple[int, ...], dict[str, Any]]],
        sources: list[ChunkSource], buffers: list[SourceBuffer],
    ) -> bool:
        """Plans the leaf if it is a common one; False (nothing done) otherwise."""
        if type(value) is np.ndarray:
            kind: str = "numpy"
            extra: dict[str, Any] = {}
        elif isinstance(value, jax.Array):
            sharding_ = value.sharding
            single = self._shardings.get(sharding_)
            if single is None:
                single = self._shardings[sharding_] = (
                    type(sharding_) is jax.sharding.SingleDeviceSharding)
            if not single or value.is_deleted():
                return False
            kind, extra = "jax", {"sharding": None}
        else:
            return False
        dtype = value.dtype
        found = self._shape(dtype, value.shape)
        if found is None:
            return False
        nbytes, start, shape = found
        arrays[index] = (kind, dtype, shape, extra)
        buffers.append(SourceBuffer(value, [(len(sources), ())], False))
        source = ChunkSource(index, path or "<root>", start, shape, dtype,
                             functools.partial(np.asarray, value))  # chunk_view(value, ())
        source.nbytes = nbytes  # known here: spares the cached property's first call
        sources.append(source)
        return True


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
    plain = _Plain()
    for index, (leaf_path, value) in enumerate(zip(structure.names, structure.leaves)):
        if assigner is None and plain.add(index, leaf_path, value, arrays, sources, buffers):
            leaves.append(None)
            continue
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


def _unsupported_message(value: Any) -> str:
    """Why a leaf cannot be stored, with the fix for the common cases."""
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if callable(getattr(value, "get_state", None)) and callable(getattr(value, "set_state", None)):
        return (f"{name} is an object with get_state()/set_state() (an iterator or data "
                "loader): save it through a CheckpointManager, which stores its state, or save "
                "obj.get_state()")
    if callable(value):
        return (f"leaves of type {name} (functions, activations, ...) cannot be stored; save "
                "only the arrays, e.g. for an equinox model eqx.filter(model, eqx.is_array), "
                "and after restoring rebuild it with eqx.combine(restored, static)")
    return (f"leaves of type {name} cannot be stored; use arrays, Python/NumPy scalars, str, "
            "bytes or None, or register the type as a pytree node")
