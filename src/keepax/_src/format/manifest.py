"""The manifest (``manifest.json``) and the commit marker (``keepax.commit``).

Both are JSON. This module turns them into dataclasses and back, and validates untrusted
input: a manifest read from storage is checked field by field before anything is allocated or
opened, so a hostile or damaged manifest can only produce a :class:`CorruptCheckpointError`
or :class:`FormatVersionError`. The normative description is ``docs/FORMAT.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, TypeVar

import msgspec
import numpy as np

from keepax._src.format import dtypes, spec
from keepax._src.format.boxes import covers_exactly
from keepax._src.format.chunk_fields import (
    parse_block_crcs,
    parse_chunk_extras,
)
from keepax._src.format.spec import (
    CODECS_VERSION,
    COMMIT_FILE,
    DATA_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHUFFLE_VERSION,
    TABLES_VERSION,
)
from keepax._src.util import gc_paused
from keepax.errors import CorruptCheckpointError, FormatVersionError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "COMMIT_FILE",
    "DATA_DIR",
    "Chunk",
    "ArrayLeaf",
    "ValueLeaf",
    "DataFile",
    "Manifest",
    "CommitMarker",
    "CellRef",
    "Layout",
    "TableRef",
    "TABLES_VERSION",
    "CODECS_VERSION",
    "SHUFFLE_VERSION",
    "parse_chunk_extras",
    "parse_block_crcs",
    "array_leaf",
    "compact_json",
    "raw_chunk",
]

_MAX_CELLS = 1 << 24  # a layout with more cells than this is rejected before allocating

ARRAY_TYPES = ("jax", "numpy", "npscalar", "bytes", "prngkey", "perprocess")
VALUE_TYPES = ("int", "float", "bool", "complex", "str")

_T = TypeVar("_T")
_PLAIN_TYPES = ("jax", "numpy", "npscalar", "bytes")  # array leaves with no extra members
_ITEMSIZES: dict[Any, int] = {}  # dtype name -> itemsize, of the names seen


def _itemsize(name: Any) -> int | None:
    """The itemsize of a manifest dtype name; None if it is not one."""
    size = _ITEMSIZES.get(name) if isinstance(name, str) else None
    if size is None:
        try:
            size = _ITEMSIZES[name] = dtypes.dtype_from_name(name).itemsize
        except ValueError:
            return None
    return size

_MAX_DIM = 1 << 48  # larger dimensions are rejected before any arithmetic or allocation


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A box of one array, stored contiguously (C order) in one data file.

    Attributes:
      file: Index into :attr:`Manifest.files`.
      offset: Absolute byte offset of the chunk in that file.
      nbytes: Size in bytes (``prod(shape) * itemsize``).
      start: Index of the box's first element in the global array.
      shape: Shape of the box.
      crc32c: CRC-32C (Castagnoli) of the chunk's stored bytes.
      codec: How the stored bytes encode the chunk: ``raw`` (they are its C-order bytes).
      stored_nbytes: Bytes the chunk occupies in the file, when they differ from ``nbytes``
        (None: ``nbytes``; a raw chunk's are always ``nbytes``).
      digest: A content digest of the chunk's (logical) bytes, ``<algorithm>:<hex>``, e.g.
        ``xxh3-128:`` and 32 hex digits (format 1.2; informational to readers).
      crc32c_block: With ``crc32c_blocks``, their block size in bytes (format 1.2; 0: none).
      crc32c_blocks: CRC-32C of each consecutive ``crc32c_block`` bytes of a raw chunk (the
        last block may be shorter), so that readers can fetch and verify part of a chunk.
    """

    file: int
    offset: int
    nbytes: int
    start: tuple[int, ...]
    shape: tuple[int, ...]
    crc32c: int
    codec: str = "raw"
    stored_nbytes: int | None = None
    digest: str | None = None
    crc32c_block: int = 0
    crc32c_blocks: tuple[int, ...] = ()

    @property
    def stored(self) -> int:
        """Bytes the chunk occupies in its data file."""
        return self.nbytes if self.stored_nbytes is None else self.stored_nbytes

    @property
    def uses_codecs(self) -> bool:
        """Whether the chunk needs format 1.2 (a codec member, a stored size or a digest)."""
        return (self.codec != "raw" or self.stored_nbytes is not None or self.digest is not None
                or bool(self.crc32c_block))

    @property
    def min_version(self) -> tuple[int, int]:
        """The lowest format version that can hold the chunk (1.0, 1.2 or its codec's)."""
        if not self.uses_codecs:
            return FORMAT_VERSION
        return max(CODECS_VERSION, spec.CODEC_VERSIONS.get(self.codec, CODECS_VERSION))

    def extras(self) -> dict[str, Any]:
        """The chunk's 1.2 members, as written (none for a plain raw chunk)."""
        out: dict[str, Any] = {}
        if self.codec != "raw" or self.stored_nbytes is not None:
            out["codec"] = self.codec
            out["stored_nbytes"] = self.stored
        if self.digest is not None:
            out["digest"] = self.digest
        if self.crc32c_block:
            out["crc32c_block"] = self.crc32c_block
            out["crc32c_blocks"] = list(self.crc32c_blocks)
        return out


@dataclasses.dataclass(frozen=True)
class CellRef:
    """How an array of a multi-process checkpoint is cut into cells (``tables.py``).

    Attributes:
      block: Shape of a cell (edge cells are cut at the array's end).
      layout: Index into :attr:`Manifest.layouts`.
      rotation: Which holder of each cell wrote it.
    """

    block: tuple[int, ...]
    layout: int
    rotation: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """A grid of cells and, per cell (C order), the processes holding a copy of it."""

    grid: tuple[int, ...]
    writers: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class TableRef:
    """A process's chunk table: its path in the checkpoint, size and CRC-32C.

    Every process writes up to two: one for the cells only it holds, and a *shared* one for
    the cells it wrote on behalf of several holders (replicated shards), which readers on
    every process need and which stays small.
    """

    process: int
    name: str
    nbytes: int
    crc32c: int
    shared: bool = False


@dataclasses.dataclass(frozen=True)
class ArrayLeaf:
    """A leaf whose bytes live in data files.

    Attributes:
      path: The leaf's key path (``jax.tree_util.keystr``).
      type: What the leaf was: ``jax`` (a ``jax.Array``), ``numpy`` (an ``np.ndarray``),
        ``npscalar`` (a NumPy scalar), ``bytes``, ``prngkey`` (a typed PRNG key array,
        stored as its key data), or ``perprocess`` (``keepax.PerProcess``: row ``i`` of a
        ``uint8`` array holds process ``i``'s copy, FORMAT.md §Per-process values).
      shape: Shape of the stored array (for ``prngkey``, of the key data).
      dtype: Manifest dtype name of the stored array.
      chunks: Where the bytes are.
      impl: For ``prngkey``: the PRNG implementation name (``threefry2x32``, ...).
      sharding: Informational description of the saved sharding, if any.
      cells: In checkpoints with chunk tables: how the array is cut. Its ``chunks`` are then
        empty until :func:`keepax._src.format.tables.resolve` fills in those a reader needs.
    """

    path: str
    type: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]
    impl: str | None = None
    sharding: dict[str, Any] | None = None
    cells: CellRef | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.dtype_from_name(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ValueLeaf:
    """A Python value stored in the manifest itself.

    Attributes:
      path: The leaf's key path.
      type: ``int``, ``float``, ``bool``, ``complex`` or ``str``.
      value: JSON value: an int, a bool, a string, the 16-hex-digit IEEE-754 bits of a float,
        or a pair of those for a complex.
    """

    path: str
    type: str
    value: Any

    nbytes = 0


Leaf = ArrayLeaf | ValueLeaf


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file of the checkpoint: its path relative to the checkpoint and its size."""

    name: str
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything about a checkpoint except the array bytes (and, with chunk tables, except
    where the chunks are)."""

    version: tuple[int, int]
    tree: dict[str, Any]
    leaves: tuple[Leaf, ...]
    files: tuple[DataFile, ...]
    metadata: dict[str, Any]
    created: float
    writer: dict[str, Any]
    tables: tuple[TableRef, ...] = ()
    layouts: tuple[Layout, ...] = ()

    @gc_paused()
    def to_json(self) -> bytes:
        """Serialises the manifest (UTF-8 JSON)."""
        leaves = []
        version = self.version
        for leaf in self.leaves:
            if isinstance(leaf, ArrayLeaf):
                # Tuples are written as JSON arrays (by msgspec and json alike).
                entry: dict[str, Any] = {
                    "path": leaf.path, "type": leaf.type, "shape": leaf.shape,
                    "dtype": leaf.dtype,
                }
                if leaf.cells is not None:
                    entry["cells"] = {
                        "block": leaf.cells.block,
                        "layout": leaf.cells.layout,
                        "rotation": leaf.cells.rotation,
                    }
                else:
                    entry["chunks"] = [_chunk_entry(c, leaf.path, version) for c in leaf.chunks]
                if leaf.impl is not None:
                    entry["impl"] = leaf.impl
                if leaf.sharding is not None:
                    entry["sharding"] = leaf.sharding
            else:
                entry = {"path": leaf.path, "type": leaf.type, "value": leaf.value}
            leaves.append(entry)
        head = json.dumps({
            "format": FORMAT_NAME,
            "version": spec.version_text(self.version),
            "created": self.created,
            "writer": self.writer,
            "metadata": self.metadata,
        }, separators=(",", ":"), allow_nan=False).encode()
        files = [{"name": f.name, "nbytes": f.nbytes} for f in self.files]
        # The bulk: keepax's own members (no JSON floats: floats are stored as hex strings).
        bulk = compact_json({"files": files, "tree": self.tree, "leaves": leaves})
        if not self.tables:
            return head[:-1] + b"," + bulk[1:]
        tail = json.dumps({
            "tables": [
                {"process": t.process, "name": t.name, "nbytes": t.nbytes, "crc32c": t.crc32c}
                | ({"shared": True} if t.shared else {})
                for t in self.tables
            ],
            "layouts": [
                {"grid": list(lay.grid), "writers": [list(w) for w in lay.writers]}
                for lay in self.layouts
            ],
        }, separators=(",", ":"), allow_nan=False).encode()
        return head[:-1] + b"," + bulk[1:-1] + b"," + tail[1:]

    @classmethod
    @gc_paused()
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        """Parses and validates an untrusted manifest.

        Args:
          data: The file's bytes.
          where: The checkpoint path, for error messages.

        Raises:
          CorruptCheckpointError: if the JSON is invalid or inconsistent.
          FormatVersionError: if it was written by a newer major format version.
        """
        try:
            try:
                doc = msgspec.json.decode(data)  # 2x faster than json
            except msgspec.DecodeError:
                # What msgspec refuses, json may still read (1e400 as inf, lone surrogates):
                # it decides, so that the validation names the field.
                doc = spec.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CorruptCheckpointError(
                f"{MANIFEST_FILE} is not valid JSON ({e}); the checkpoint is damaged: restore "
                "an earlier one",
                path=where,
            ) from e
        return _Validator(where).manifest(doc)


@dataclasses.dataclass(frozen=True)
class CommitMarker:
    """The commit marker, written last: it names the manifest's size and checksum."""

    version: tuple[int, int]
    manifest_nbytes: int
    manifest_crc32c: int
    committed: float

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "version": spec.version_text(self.version),
                "manifest_nbytes": self.manifest_nbytes,
                "manifest_crc32c": self.manifest_crc32c,
                "committed": self.committed,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> CommitMarker:
        try:
            doc = spec.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CorruptCheckpointError(
                f"{COMMIT_FILE} is not valid JSON ({e})", path=where
            ) from e
        v = _Validator(where)
        v.obj(doc, COMMIT_FILE)
        version = v.version(doc)
        return cls(
            version=version,
            manifest_nbytes=v.nat(doc.get("manifest_nbytes"), "manifest_nbytes"),
            manifest_crc32c=v.nat(doc.get("manifest_crc32c"), "manifest_crc32c"),
            committed=v.time(doc.get("committed"), "committed"),
        )


def _chunk_entry(c: Chunk, path: str, version: tuple[int, int]) -> dict[str, Any]:
    """A chunk's manifest entry (``path``, ``version``: its leaf's and the manifest's); raises
    ValueError if the chunk's codec or digest needs a later format version."""
    entry = {"file": c.file, "offset": c.offset, "nbytes": c.nbytes, "start": c.start,
             "shape": c.shape, "crc32c": c.crc32c}
    if c.codec == "raw" and c.stored_nbytes is None and c.digest is None and not c.crc32c_block:
        return entry  # the plain raw chunk: format 1.0
    need = c.min_version
    if version < need:
        raise ValueError(
            f"{path}: its chunks' codecs and digests need format version "
            f"{spec.version_text(need)}, not {spec.version_text(version)}"
        )
    return entry | c.extras()


def compact_json(doc: Any) -> bytes:
    """``json.dumps(doc)``, compact, for documents without floats: the same bytes, written by
    msgspec (10x faster) when they are printable ASCII (json escapes the rest)."""
    data = msgspec.json.encode(doc)
    if data.isascii() and b"\x7f" not in data:
        return data
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def array_leaf(path: str, type: str, shape: tuple[int, ...], dtype: str,
               chunks: tuple[Chunk, ...], impl: str | None = None,
               sharding: dict[str, Any] | None = None, cells: CellRef | None = None
               ) -> ArrayLeaf:
    """``ArrayLeaf(...)`` for fields the caller made (half the cost: a save makes one per
    leaf)."""
    return _new(ArrayLeaf, {"path": path, "type": type, "shape": shape, "dtype": dtype,
                            "chunks": chunks, "impl": impl, "sharding": sharding,
                            "cells": cells})


def raw_chunk(file: int, offset: int, nbytes: int, start: tuple[int, ...],
              shape: tuple[int, ...], crc32c: int, crc32c_block: int = 0,
              crc32c_blocks: tuple[int, ...] = ()) -> Chunk:
    """``Chunk(...)`` of a raw chunk, for fields the caller made (a save makes one per
    chunk)."""
    return _new(Chunk, {"file": file, "offset": offset, "nbytes": nbytes, "start": start,
                        "shape": shape, "crc32c": crc32c, "codec": "raw", "stored_nbytes": None,
                        "digest": None, "crc32c_block": crc32c_block,
                        "crc32c_blocks": crc32c_blocks})


def _new(cls: type[_T], fields: dict[str, Any]) -> _T:
    """A frozen dataclass instance made from all its fields, already validated (half the
    cost of calling the class, which sets each field through ``object.__setattr__``)."""
    made = object.__new__(cls)
    made.__dict__.update(fields)
    return made


def _nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _nats(x: Any, n: int) -> bool:
    return type(x) is list and len(x) == n and all(type(i) is int and 0 <= i <= _MAX_DIM for i in x)


class _Validator:
    """Checks untrusted JSON, raising CorruptCheckpointError naming the checkpoint and field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._files: list[DataFile] = []
        self._claimed: list[int] = []
        self._seen: dict[int, set[tuple[int, int]]] = {}
        self._layouts: tuple[Layout, ...] = ()
        self._with_tables = False
        self._version = FORMAT_VERSION

    def fail(self, message: str, leaf: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"invalid manifest: {message}; the checkpoint is damaged or was not written by "
            "keepax",
            path=self.where,
            leaf=leaf,
        )

    def obj(self, x: Any, what: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise self.fail(f"{what} must be an object")
        return x

    def nat(self, x: Any, what: str, leaf: str | None = None) -> int:
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise self.fail(f"{what} must be a non-negative integer, got {x!r:.40}", leaf)
        return x

    def time(self, x: Any, what: str) -> float:
        value = spec.finite_time(x)
        if value is None:
            raise self.fail(f"{what} must be a Unix time in seconds, got {x!r:.40}")
        return value

    def ints(self, x: Any, what: str, leaf: str | None = None) -> tuple[int, ...]:
        if type(x) is list and len(x) <= 64 and all(
            type(i) is int and 0 <= i <= _MAX_DIM for i in x
        ):
            return tuple(x)
        if not isinstance(x, list) or len(x) > 64:
            raise self.fail(f"{what} must be a list of at most 64 integers", leaf)
        out = tuple(self.nat(i, what, leaf) for i in x)
        if any(i > _MAX_DIM for i in out):
            raise self.fail(f"{what} has a dimension above 2**48", leaf)
        return out

    def version(self, doc: dict[str, Any]) -> tuple[int, int]:
        if doc.get("format") != FORMAT_NAME:
            raise self.fail(f"format is {doc.get('format')!r:.40}, expected {FORMAT_NAME!r}")
        text = doc.get("version")
        parsed = spec.parse_version(text)
        if parsed is None:
            raise self.fail(f"version must be 'MAJOR.MINOR', got {text!r:.40}")
        major, minor = parsed
        if major > FORMAT_VERSION[0]:
            raise FormatVersionError(
                f"written in keepax format {major}.{minor}, but this keepax reads format "
                f"{FORMAT_VERSION[0]}.x only; upgrade keepax to read it",
                path=self.where,
            )
        if major < 1:
            raise FormatVersionError(f"unknown keepax format version {text}", path=self.where)
        return major, minor

    def manifest(self, doc: Any) -> Manifest:
        doc = self.obj(doc, "the manifest")
        version = self._version = self.version(doc)
        files = []
        names: set[str] = set()
        for i, f in enumerate(self._list(doc.get("files"), "files")):
            f = self.obj(f, f"files[{i}]")
            name = f.get("name")
            if not isinstance(name, str) or not (
                (spec.DATA_FILE_RE.fullmatch(name) and ".." not in name)
                or (version >= CODECS_VERSION and spec.STORE_FILE_RE.fullmatch(name)
                    and ".." not in name[3:])
            ):
                raise self.fail(f"files[{i}].name {name!r:.80} is not a data file name")
            if name in names:
                raise self.fail(f"files[{i}].name {name!r:.80} is listed twice")
            names.add(name)
            files.append(DataFile(name, self.nat(f.get("nbytes"), f"files[{i}].nbytes")))
        self._files = files
        self._claimed = [0] * len(files)
        tables, layouts = self._tables(doc, version)
        if "tables" in doc and (not tables or files):
            # Else leaves with cells would get no chunks at all, or chunks into files that
            # resolve() replaces by the tables' files.
            raise self.fail("a manifest with chunk tables lists at least one table and no files")
        self._layouts = layouts
        self._with_tables = "tables" in doc
        self._ranges: tuple[list[int], list[int], list[int]] = ([], [], [])
        leaves = tuple(
            self._plain_leaf(x) or self._leaf(x, i, len(files))
            for i, x in enumerate(self._list(doc.get("leaves"), "leaves"))
        )
        if self._ranges_overlap(leaves):
            self._check_byte_ranges(leaves)
        tree = self.obj(doc.get("tree"), "tree")
        metadata = doc.get("metadata", {})
        writer = doc.get("writer", {})
        return Manifest(
            version=version,
            tree=tree,
            leaves=leaves,
            files=tuple(files),
            metadata=self.obj(metadata, "metadata"),
            created=self.time(doc.get("created", 0), "created"),
            writer=self.obj(writer, "writer"),
            tables=tables,
            layouts=layouts,
        )

    def _tables(
        self, doc: dict[str, Any], version: tuple[int, int]
    ) -> tuple[tuple[TableRef, ...], tuple[Layout, ...]]:
        """Parses the chunk table list and the cell layouts (format 1.1)."""
        if "tables" not in doc:
            return (), ()
        if version < TABLES_VERSION:
            raise self.fail(f"tables need format {TABLES_VERSION[0]}.{TABLES_VERSION[1]}")
        tables = []
        for i, t in enumerate(self._list(doc.get("tables"), "tables")):
            t = self.obj(t, f"tables[{i}]")
            name = t.get("name")
            if not isinstance(name, str) or not spec.TABLE_FILE_RE.fullmatch(name) or ".." in name:
                raise self.fail(f"tables[{i}].name {name!r:.80} is not a chunk table name")
            shared = t.get("shared", False)
            if not isinstance(shared, bool):
                raise self.fail(f"tables[{i}].shared must be true or false")
            tables.append(TableRef(
                self.nat(t.get("process"), f"tables[{i}].process"), name,
                self.nat(t.get("nbytes"), f"tables[{i}].nbytes"),
                self.nat(t.get("crc32c"), f"tables[{i}].crc32c"),
                shared,
            ))
        if len({(t.process, t.shared) for t in tables}) != len(tables) or len(
            {t.name for t in tables}
        ) != len(tables):
            raise self.fail("a table of a process or a table name is listed twice in tables")
        processes = {t.process for t in tables}
        layouts = []
        for i, lay in enumerate(self._list(doc.get("layouts"), "layouts")):
            lay = self.obj(lay, f"layouts[{i}]")
            grid = self.ints(lay.get("grid"), f"layouts[{i}].grid")
            if any(g < 1 for g in grid) or math.prod(grid) > _MAX_CELLS:
                raise self.fail(f"layouts[{i}].grid must hold 1 to 2**24 cells of >= 1")
            raw = self._list(lay.get("writers"), f"layouts[{i}].writers")
            if len(raw) != math.prod(grid):
                raise self.fail(f"layouts[{i}] needs one writers list per cell")
            writers = []
            for w in raw:
                if not isinstance(w, list) or not all(_nat(p) and p in processes for p in w):
                    raise self.fail(f"layouts[{i}].writers names a process without a table")
                writers.append(tuple(w))
            layouts.append(Layout(grid, tuple(writers)))
        return tuple(tables), tuple(layouts)

    def _plain_leaf(self, x: Any) -> ArrayLeaf | None:
        """The common leaf, checked fast: an array in one raw chunk holding all its (> 0)
        elements. None for any other leaf, valid or not (:meth:`_leaf` then checks it and
        says what is wrong), before changing any state."""
        if type(x) is not dict or self._with_tables or x.get("type") not in _PLAIN_TYPES:
            return None
        path, shape, chunks = x.get("path"), x.get("shape"), x.get("chunks")
        itemsize = _itemsize(x.get("dtype"))
        if ("cells" in x or type(path) is not str or type(shape) is not list or len(shape) > 64
                or type(chunks) is not list or len(chunks) != 1 or itemsize is None):
            return None
        c = chunks[0]
        if type(c) is not dict or len(c) != 6:  # else extras (format 1.2) or missing members
            return None
        file, offset, nbytes, crc = c.get("file"), c.get("offset"), c.get("nbytes"), c.get(
            "crc32c")
        volume = 1
        for d in shape:
            if type(d) is not int or not 0 < d <= _MAX_DIM:
                return None
            volume *= d
        if not (type(file) is int and type(offset) is int and type(crc) is int
                and 0 <= file < len(self._files) and offset >= 0 and crc >= 0
                and nbytes == volume * itemsize and c.get("shape") == shape
                and c.get("start") == [0] * len(shape)):
            return None
        end = offset + nbytes
        if end > self._files[file].nbytes or self._claimed[file] + nbytes > self._files[
                file].nbytes or (offset, nbytes) in self._seen.get(file, ()):
            return None
        self._seen.setdefault(file, set()).add((offset, nbytes))
        self._claimed[file] += nbytes
        files, begins, ends = self._ranges
        files.append(file)
        begins.append(offset)
        ends.append(end)
        sharding, impl = x.get("sharding"), x.get("impl")
        box = tuple(shape)
        return _new(ArrayLeaf, {
            "path": path, "type": x["type"], "shape": box, "dtype": x["dtype"],
            "chunks": (_new(Chunk, {
                "file": file, "offset": offset, "nbytes": nbytes, "start": (0,) * len(box),
                "shape": box, "crc32c": crc, "codec": "raw", "stored_nbytes": None,
                "digest": None, "crc32c_block": 0, "crc32c_blocks": (),
            }),),
            "impl": impl if isinstance(impl, str) else None,
            "sharding": sharding if isinstance(sharding, dict) else None, "cells": None,
        })

    def _ranges_overlap(self, leaves: tuple[Leaf, ...]) -> bool:
        """Whether the chunks may share bytes of a data file (:meth:`_check_byte_ranges`
        decides), checked with NumPy: the leaves :meth:`_plain_leaf` took have their ranges
        in ``self._ranges``; any other leaf with chunks sends the decision there."""
        if len(self._ranges[0]) != sum(
            len(leaf.chunks) for leaf in leaves if type(leaf) is ArrayLeaf
        ):
            return True
        files, begins, ends = (np.asarray(r, dtype=np.int64) for r in self._ranges)
        order = np.lexsort((ends, begins, files))
        files, begins, ends = files[order], begins[order], ends[order]
        return bool(np.any((files[1:] == files[:-1]) & (begins[1:] < ends[:-1])))

    def _check_byte_ranges(self, leaves: tuple[Leaf, ...]) -> None:
        """No two chunks may share bytes of a data file."""
        ranges = sorted({
            (c.file, c.offset, c.offset + c.stored, leaf.path)
            for leaf in leaves
            if isinstance(leaf, ArrayLeaf)
            for c in leaf.chunks
            if c.stored
        })
        for (f0, begin0, end0, _), (f1, begin1, end1, path) in zip(ranges, ranges[1:]):
            if f0 == f1 and (begin0, end0) == (begin1, end1) and self._version >= CODECS_VERSION:
                continue  # identical chunks share stored bytes (format 1.2, §15)
            if f0 == f1 and begin1 < end0:
                raise self.fail(f"chunks overlap in {self._files[f1].name}", path)

    def _list(self, x: Any, what: str) -> list[Any]:
        if not isinstance(x, list):
            raise self.fail(f"{what} must be a list")
        return x

    def _chunk(
        self, c: Any, j: int, path: str, shape: tuple[int, ...], itemsize: int
    ) -> Chunk:
        try:
            file, offset, nbytes = c["file"], c["offset"], c["nbytes"]
            start, box, crc = c["start"], c["shape"], c["crc32c"]
        except (KeyError, TypeError):
            raise self.fail(f"chunk {j} must be an object with file, offset, nbytes, start, "
                            "shape and crc32c", path) from None
        if not (type(file) is int and type(offset) is int and type(nbytes) is int
                and type(crc) is int and file >= 0 and offset >= 0 and nbytes >= 0
                and crc >= 0):
            raise self.fail(f"chunk {j}: file, offset, nbytes and crc32c must be non-negative "
                            "integers", path)
        if not (_nats(start, len(shape)) and _nats(box, len(shape))):
            raise self.fail(f"chunk {j}: start and shape must be {len(shape)} non-negative "
                            "integers", path)
        if file >= len(self._files):
            raise self.fail(f"chunk {j} names file {file} of {len(self._files)}", path)
        codec: str = "raw"
        stored: int | None = None
        digest: str | None = None
        if "codec" in c or "stored_nbytes" in c or "digest" in c:  # else a plain raw chunk
            codec, stored, digest = parse_chunk_extras(
                c, nbytes, self._version, where=self.where, leaf=path,
                fail=lambda message: self.fail(f"chunk {j}: {message}", path),
            )
        size = nbytes if stored is None else stored
        entry = self._files[file]
        if offset + size > entry.nbytes:
            raise self.fail(f"chunk {j} lies beyond the end of {entry.name}", path)
        if (offset, size) not in self._seen.setdefault(file, set()):
            # A chunk store's bytes may back several identical chunks (format 1.2, §15).
            self._seen[file].add((offset, size))
            self._claimed[file] += size
        if self._claimed[file] > entry.nbytes:
            raise self.fail(f"chunks claim more bytes than {entry.name} has", path)
        if any(s + n > d for s, n, d in zip(start, box, shape)):
            raise self.fail(f"chunk {j} lies outside the array", path)
        if nbytes != math.prod(box) * itemsize:
            raise self.fail(f"chunk {j} size {nbytes} does not match its shape", path)
        block, crcs = (0, ()) if "crc32c_block" not in c and "crc32c_blocks" not in c else (
            parse_block_crcs(
                c, nbytes, codec, lambda message: self.fail(f"chunk {j}: {message}", path)
            )
        )
        return _new(Chunk, {
            "file": file, "offset": offset, "nbytes": nbytes, "start": tuple(start),
            "shape": tuple(box), "crc32c": crc, "codec": codec, "stored_nbytes": stored,
            "digest": digest, "crc32c_block": block, "crc32c_blocks": crcs,
        })

    def _leaf(self, x: Any, index: int, nfiles: int) -> Leaf:
        x = self.obj(x, f"leaves[{index}]")
        path = x.get("path")
        if not isinstance(path, str):
            raise self.fail(f"leaves[{index}].path must be a string")
        kind = x.get("type")
        if kind in VALUE_TYPES:
            if "value" not in x:
                raise self.fail("value leaf without a value", path)
            return ValueLeaf(path, kind, x["value"])
        if kind not in ARRAY_TYPES:
            raise self.fail(f"unknown leaf type {kind!r:.40}", path)
        shape = self.ints(x.get("shape"), "shape", path)
        name = x.get("dtype")
        try:
            itemsize = dtypes.dtype_from_name(name).itemsize
        except ValueError as e:
            raise self.fail(str(e), path) from e
        cells = None
        chunks: list[Chunk] = []
        if ("cells" in x) != self._with_tables:
            raise self.fail("an array leaf has cells if and only if the manifest has chunk "
                            "tables", path)
        if "cells" in x:
            cells = self._cells(x["cells"], path, shape)
        else:
            chunk_list = self._list(x.get("chunks"), "chunks")
            chunks = [self._chunk(c, j, path, shape, itemsize) for j, c in enumerate(chunk_list)]
            volume = sum(math.prod(c.shape) for c in chunks)
            if volume != math.prod(shape):
                raise self.fail(
                    f"chunks cover {volume} elements of an array of {math.prod(shape)}", path
                )
            # One chunk inside the array holding all its (> 0) elements is the whole array.
            if not (len(chunks) == 1 and volume) and not covers_exactly(
                [(c.start, c.shape) for c in chunks], [((0,) * len(shape), shape)]
            ):
                raise self.fail("chunks of the array overlap", path)
        impl = x.get("impl")
        if kind == "prngkey" and (not isinstance(impl, str) or name != "uint32" or not shape):
            raise self.fail("prngkey leaf needs an impl name and uint32 key data", path)
        sharding = x.get("sharding")
        return _new(ArrayLeaf, {
            "path": path, "type": kind, "shape": shape, "dtype": name, "chunks": tuple(chunks),
            "impl": impl if isinstance(impl, str) else None,
            "sharding": sharding if isinstance(sharding, dict) else None, "cells": cells,
        })

    def _cells(self, x: Any, path: str, shape: tuple[int, ...]) -> CellRef:
        x = self.obj(x, "cells")
        block = self.ints(x.get("block"), "cells.block", path)
        layout = self.nat(x.get("layout"), "cells.layout", path)
        rotation = self.nat(x.get("rotation"), "cells.rotation", path)
        if layout >= len(self._layouts):
            raise self.fail(f"cells.layout {layout} of {len(self._layouts)}", path)
        grid = self._layouts[layout].grid
        if len(block) != len(shape) or any(b < 1 for b in block) or grid != tuple(
            max(1, -(-n // b)) for n, b in zip(shape, block)
        ):
            raise self.fail("cells.block does not cut the array into its layout's grid", path)
        return CellRef(block, layout, rotation)
