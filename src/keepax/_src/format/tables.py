"""Per-process chunk tables: who writes which shard, and where readers find its bytes.

A checkpoint written by several processes (format 1.1, ``docs/FORMAT.md`` §14) keeps no chunk
list in its manifest. Instead:

- every array is cut into *cells*, the unique shards of its sharding, which form a regular
  grid: cell ``k`` along axis ``d`` covers ``[k * block[d], min((k + 1) * block[d], shape[d]))``;
- a *layout* (shared by every array sharded the same way) names, per cell, the processes that
  hold a copy of it; the array's ``rotation`` picks which of them writes it, so the writing of
  replicated arrays is spread over the replicas;
- every process writes its own *chunk table* next to its data files, listing the chunks it
  wrote (the manifest lists only the tables, with their sizes and checksums).

Every process computes the same assignment from the global shardings alone, so no chunk list
ever travels between processes, and a reader fetches only the tables of the cells it needs.
The planning half of this module is pure; :func:`resolve` reads tables through a storage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any

from keepax._src.format import dtypes, spec
from keepax._src.format.boxes import Box, covers_exactly
from keepax._src.format.manifest import (
    ArrayLeaf,
    CellRef,
    Chunk,
    DataFile,
    Layout,
    Manifest,
    TableRef,
    parse_block_crcs,
    parse_chunk_extras,
)
from keepax._src.format.spec import FORMAT_NAME
from keepax._src.io.base import Storage
from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = [
    "TABLE_VERSION",
    "Assignment",
    "Assigner",
    "table_name",
    "split_shared",
    "encode_table",
    "resolve",
    "read_tables",
    "cells_of",
    "grid_of",
]

TABLE_VERSION = spec.TABLES_VERSION
"""Written by tables without 1.2 members; a table with codecs or digests is written as 1.2."""
_TABLE_KIND = "chunk-table"
_MAX_ROTATION_TRIES = 4


def table_name(process: int, shared: bool = False) -> str:
    """The path (relative to the checkpoint) of a process's chunk table: of the cells only it
    holds, or (``shared``) of the replicated cells it wrote."""
    return f"data/p{process:05d}-{'shared' if shared else 'chunks'}.json"


def is_shared(layout: Layout, index: int) -> bool:
    """Whether cell ``index`` has several holders (its chunks go to the shared table)."""
    return len(layout.writers[index]) > 1


def split_shared(
    manifest_cells: Mapping[int, CellRef], layouts: Sequence[Layout],
    chunks: Iterable[tuple[int, Chunk]],
) -> tuple[list[tuple[int, Chunk]], list[tuple[int, Chunk]]]:
    """Splits (leaf, chunk) pairs into those of cells with one holder and the shared ones."""
    private: list[tuple[int, Chunk]] = []
    shared: list[tuple[int, Chunk]] = []
    for leaf, chunk in chunks:
        ref = manifest_cells[leaf]
        layout = layouts[ref.layout]
        index = linear(tuple(s // b for s, b in zip(chunk.start, ref.block)), layout.grid)
        (shared if is_shared(layout, index) else private).append((leaf, chunk))
    return private, shared


# ---------------------------------------------------------------------------------------------
# Planning (pure).


def grid_of(shape: Sequence[int], boxes: Iterable[Box]) -> tuple[int, ...] | None:
    """The block shape of a regular grid whose cells are exactly ``boxes``, or None.

    Empty boxes (which JAX gives devices past the end of an unevenly split axis) are ignored.
    """
    shape = tuple(shape)
    boxes = {b for b in boxes if math.prod(b[1]) > 0}
    if math.prod(shape) == 0:
        return tuple(1 for _ in shape)
    block = []
    for d, n in enumerate(shape):
        starts = sorted({b[0][d] for b in boxes})
        size = starts[1] - starts[0] if len(starts) > 1 else n
        if size <= 0 or any(s != k * size for k, s in enumerate(starts)):
            return None
        block.append(size)
    block_t = tuple(block)
    grid = grid_shape(shape, block_t)
    if len(boxes) != math.prod(grid):
        return None
    for box_start, box_size in boxes:
        want = tuple(min(b, n - s) for s, b, n in zip(box_start, block_t, shape))
        if box_size != want or any(s % b for s, b in zip(box_start, block_t)):
            return None
    return block_t


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Cells per axis of an array of ``shape`` cut into blocks of ``block``."""
    return tuple(max(1, -(-n // b)) for n, b in zip(shape, block))


def cell_box(shape: Sequence[int], block: Sequence[int], cell: Sequence[int]) -> Box:
    """The box of the cell with grid coordinates ``cell``."""
    start = tuple(k * b for k, b in zip(cell, block))
    size = tuple(max(0, min(b, n - s)) for s, b, n in zip(start, block, shape))
    return start, size


def cells_of(shape: Sequence[int], block: Sequence[int], box: Box) -> Iterable[tuple[int, ...]]:
    """Grid coordinates of the cells a non-empty box overlaps."""
    ranges = [
        range(s // b, (s + n - 1) // b + 1) if n else range(0)
        for s, n, b in zip(box[0], box[1], block)
    ]
    return itertools.product(*ranges)


def linear(cell: Sequence[int], grid: Sequence[int]) -> int:
    """C-order index of a cell in its grid."""
    index = 0
    for k, g in zip(cell, grid):
        index = index * g + k
    return index


def writer_of(layout: Layout, rotation: int, index: int) -> int | None:
    """The process whose table holds cell ``index`` (None: no process stored it here)."""
    holders = layout.writers[index]
    if not holders:
        return None
    return holders[(index + rotation) % len(holders)]


@dataclasses.dataclass(frozen=True)
class Assignment:
    """How one array leaf is cut and who writes what.

    Attributes:
      ref: What the manifest records for the leaf.
      mine: Boxes this process writes (each a whole cell).
    """

    ref: CellRef
    mine: tuple[Box, ...]


@dataclasses.dataclass(frozen=True)
class _Cut:
    """How arrays of one shape and sharding are cut (the same for all of them).

    Attributes:
      block: Cell shape.
      layout_index: Index of ``layout`` in :attr:`Assigner.layouts`.
      layout: The grid and each cell's holders.
      boxes: Per cell (C order), its box, or None when it is empty.
      replicated: Whether some cell has several holders (then the rotation is chosen per
        array, to spread the writing).
      mine: Without replicated cells: the boxes this process writes.
    """

    block: tuple[int, ...]
    layout_index: int
    layout: Layout
    boxes: tuple[Box | None, ...]
    replicated: bool
    mine: tuple[Box, ...]


class Assigner:
    """Decides, identically on every process, which process writes each cell of each array.

    A replicated cell goes to the holder that has been given the fewest bytes of replicated
    cells so far (among a few rotations), so their writing is spread over processes; cells
    with one holder are written by it. The cut of arrays sharing a shape and sharding is
    computed once (pass ``key``): planning a save of many arrays costs per distinct sharding,
    not per array and device.

    Args:
      process: This process's index.
      process_count: How many processes save.
      host_local: Every process writes every cell it holds, into its own directory (no shared
        storage); the layouts then name only this process.
    """

    def __init__(self, process: int, process_count: int, *, host_local: bool = False) -> None:
        self.process, self.process_count, self.host_local = process, process_count, host_local
        self.layouts: list[Layout] = []
        self._layout_index: dict[Layout, int] = {}
        self._load = [0] * process_count
        self._cuts: dict[Hashable, _Cut | None] = {}

    def leaf(
        self,
        shape: Sequence[int],
        itemsize: int,
        holders: Mapping[Box, Iterable[int]] | Callable[[], Mapping[Box, Iterable[int]]],
        *,
        key: Hashable | None = None,
    ) -> Assignment | None:
        """Assigns the cells of one array.

        Args:
          shape: The array's global shape.
          itemsize: Bytes per element.
          holders: Every unique shard (box) of the array with the processes holding a copy,
            or a function returning them (called only when ``key`` was not seen before).
          key: Identifies arrays cut alike (e.g. ``(sharding, shape)``); None: no caching.

        Returns:
          The assignment, or None if the shards do not form a regular grid.
        """
        shape = tuple(shape)
        if key is not None and key in self._cuts:
            cut = self._cuts[key]
        else:
            cut = self._cut(shape, holders() if callable(holders) else holders)
            if key is not None:
                self._cuts[key] = cut
        if cut is None:
            return None
        if not cut.replicated:
            return Assignment(CellRef(cut.block, cut.layout_index, 0), cut.mine)
        rotation = self._rotation(cut, itemsize)
        mine = tuple(box for k, box in enumerate(cut.boxes)
                     if box is not None and writer_of(cut.layout, rotation, k) == self.process)
        return Assignment(CellRef(cut.block, cut.layout_index, rotation), mine)

    def _cut(self, shape: tuple[int, ...], holders: Mapping[Box, Iterable[int]]) -> _Cut | None:
        block = grid_of(shape, holders)
        if block is None:
            return None
        grid = grid_shape(shape, block)
        writers: list[tuple[int, ...]] = [() for _ in range(math.prod(grid))]
        boxes: list[Box | None] = [None] * len(writers)
        for box, procs in holders.items():
            if math.prod(box[1]) == 0:
                continue
            cell = linear(tuple(s // b for s, b in zip(box[0], block)), grid)
            writers[cell] = tuple(sorted(set(writers[cell]) | set(procs)))
            boxes[cell] = box
        if self.host_local:
            writers = [(self.process,) if self.process in w else () for w in writers]
        layout = Layout(tuple(grid), tuple(writers))
        index = self._layout_index.get(layout)
        if index is None:
            index = self._layout_index[layout] = len(self.layouts)
            self.layouts.append(layout)
        replicated = any(len(w) > 1 for w in writers)
        mine = () if replicated else tuple(
            box for box, w in zip(boxes, writers) if box is not None and w == (self.process,)
        )
        return _Cut(block, index, layout, tuple(boxes), replicated, mine)

    def _rotation(self, cut: _Cut, itemsize: int) -> int:
        layout = cut.layout
        sizes = [math.prod(b[1]) * itemsize if b is not None else 0 for b in cut.boxes]
        if len(sizes) == 1:
            # One cell (a replicated array): the least loaded holder writes it.
            holders = layout.writers[0]
            candidates = [min(range(len(holders)), key=lambda i: (self._load[holders[i]], i))]
        else:
            width = max(len(w) for w in layout.writers)
            candidates = list(range(min(width, _MAX_ROTATION_TRIES)))
        best_rotation, best_peak = 0, None
        for rotation in candidates:
            added: dict[int, int] = {}
            for k, size in enumerate(sizes):
                w = writer_of(layout, rotation, k)
                if w is not None:
                    added[w] = added.get(w, 0) + size
            peak = max((self._load[w] + n for w, n in added.items()), default=0)
            if best_peak is None or peak < best_peak:
                best_rotation, best_peak = rotation, peak
        for k, size in enumerate(sizes):
            w = writer_of(layout, best_rotation, k)
            if w is not None:
                self._load[w] += size
        return best_rotation


# ---------------------------------------------------------------------------------------------
# Tables on storage.


def encode_table(
    process: int, files: Sequence[DataFile], chunks: Iterable[tuple[int, Chunk]],
    *, save_id: str | None = None,
) -> bytes:
    """Serialises one process's chunk table.

    A row is ``[leaf, file, offset, nbytes, crc32c, start, shape]``, followed, for a chunk
    with a codec, stored size, digest or block checksums (format 1.2), by an object holding
    those members.

    Args:
      process: The writing process.
      files: Its data files (chunks refer to them by index).
      chunks: (leaf index, chunk) pairs.
      save_id: The id of the save that wrote it (every table of one checkpoint carries the
        same; readers reject a checkpoint whose tables carry different ones).
    """
    rows: list[list[Any]] = []
    version = TABLE_VERSION
    for leaf, c in chunks:
        row: list[Any] = [leaf, c.file, c.offset, c.nbytes, c.crc32c, list(c.start),
                          list(c.shape)]
        if c.uses_codecs:
            row.append(c.extras())
            version = max(version, c.min_version)
        rows.append(row)
    doc = {
        "format": FORMAT_NAME,
        "version": spec.version_text(version),
        "kind": _TABLE_KIND,
        "process": process,
        **({"save_id": save_id} if save_id is not None else {}),
        "files": [{"name": f.name, "nbytes": f.nbytes} for f in files],
        "chunks": rows,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


@dataclasses.dataclass(frozen=True)
class _Table:
    files: tuple[DataFile, ...]
    chunks: dict[int, list[Chunk]]  # leaf index -> chunks (file indices local to the table)
    save_id: str | None = None


def _fail(where: str, name: str, message: str, leaf: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"invalid chunk table {name}: {message}; the checkpoint is damaged: restore an earlier "
        "one", path=where, leaf=leaf
    )


def _parse_table(data: bytes, ref: TableRef, manifest: Manifest, where: str) -> _Table:
    """Parses and validates one untrusted table against the manifest."""
    name = ref.name
    try:
        doc = spec.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(where, name, f"not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or doc.get(
        "kind"
    ) != _TABLE_KIND:
        raise _fail(where, name, "not a keepax chunk table")
    version = spec.parse_version(doc.get("version"))
    if version is None or version[0] != spec.FORMAT_VERSION[0]:
        raise _fail(where, name, f"its version {doc.get('version')!r:.20} is not "
                                 f"{spec.FORMAT_VERSION[0]}.x")
    if type(doc.get("process")) is not int or doc.get("process") != ref.process:
        raise _fail(where, name, f"written by process {doc.get('process')!r:.20}, the manifest "
                                 f"says {ref.process}")
    save_id = doc.get("save_id")
    if save_id is not None and not isinstance(save_id, str):
        raise _fail(where, name, "save_id must be a string")
    raw_files, raw_chunks = doc.get("files"), doc.get("chunks")
    if not isinstance(raw_files, list) or not isinstance(raw_chunks, list):
        raise _fail(where, name, "files and chunks must be lists")
    files = _parse_files(raw_files, where, name, version)
    chunks: dict[int, list[Chunk]] = {}
    ranges: list[tuple[int, int, int]] = []
    for j, entry in enumerate(raw_chunks):
        leaf_index, chunk = _parse_row(entry, j, ref, manifest, files, version, where)
        chunks.setdefault(leaf_index, []).append(chunk)
        if chunk.stored:
            ranges.append((chunk.file, chunk.offset, chunk.offset + chunk.stored))
    ranges = sorted(set(ranges) if version >= spec.CODECS_VERSION else ranges)
    for (f0, _, end0), (f1, begin1, _) in zip(ranges, ranges[1:]):
        # (In 1.2, identical chunks may share stored bytes: §15.)
        if f0 == f1 and begin1 < end0:
            raise _fail(where, name, f"chunks overlap in {files[f1].name}")
    return _Table(tuple(files), chunks, save_id)


def check_save_ids(names: Sequence[str], save_ids: Sequence[str | None], where: str) -> None:
    """Raises unless every chunk table read was written by the same save.

    Raises:
      CorruptCheckpointError: Two tables carry different save ids (a checkpoint mixing the
        data of two saves).
    """
    ids = {i for i in save_ids if i is not None}
    if len(ids) > 1 or (ids and None in save_ids):
        shown = ", ".join(f"{n}: {i or 'none'}" for n, i in zip(names, save_ids))
        raise CorruptCheckpointError(
            f"its chunk tables were written by different saves ({shown}): it mixes the data of "
            "two saves; restore an earlier checkpoint", path=where)


def _parse_files(raw_files: list[Any], where: str, name: str, version: tuple[int, int]
                 ) -> list[DataFile]:
    files = []
    for i, f in enumerate(raw_files):
        fname = f.get("name") if isinstance(f, dict) else None
        size = f.get("nbytes") if isinstance(f, dict) else None
        if not isinstance(fname, str) or not _file_name_ok(fname, version):
            raise _fail(where, name, f"files[{i}] has no valid data file name")
        if type(size) is not int or size < 0:
            raise _fail(where, name, f"files[{i}].nbytes must be a non-negative integer")
        files.append(DataFile(fname, size))
    if len({f.name for f in files}) != len(files):
        raise _fail(where, name, "a data file is listed twice")
    return files


def _file_name_ok(name: str, version: tuple[int, int]) -> bool:
    """A table's data file: its own (``data/...``) or, in 1.2, a chunk store file (§15)."""
    if spec.DATA_FILE_RE.fullmatch(name):
        return ".." not in name
    return (version >= spec.CODECS_VERSION and spec.STORE_FILE_RE.fullmatch(name) is not None
            and ".." not in name[3:])


def _parse_row(
    entry: Any, j: int, ref: TableRef, manifest: Manifest, files: Sequence[DataFile],
    version: tuple[int, int], where: str,
) -> tuple[int, Chunk]:
    """One untrusted table row -> (leaf index, chunk), checked against the manifest's cells."""
    name = ref.name
    if not (isinstance(entry, list) and len(entry) in (7, 8)
            and all(type(x) is int and x >= 0 for x in entry[:5])
            and (len(entry) == 7 or isinstance(entry[7], dict))):
        raise _fail(where, name, f"chunk {j} must be [leaf, file, offset, nbytes, crc32c, "
                                 "start, shape] (and, in format 1.2, an object of extras)")
    leaf_index, file, offset, nbytes, crc, start, box = entry[:7]
    if leaf_index >= len(manifest.leaves):
        raise _fail(where, name, f"chunk {j} names leaf {leaf_index}")
    leaf = manifest.leaves[leaf_index]
    if not isinstance(leaf, ArrayLeaf) or leaf.cells is None:
        raise _fail(where, name, f"chunk {j} names a leaf without cells")
    rank = len(leaf.shape)
    if not (isinstance(start, list) and isinstance(box, list) and len(start) == rank
            and len(box) == rank
            and all(type(x) is int and x >= 0 for x in start + box)):
        raise _fail(where, name, f"chunk {j}: start and shape must be {rank} integers",
                    leaf.path)
    codec, stored, digest = parse_chunk_extras(
        entry[7] if len(entry) == 8 else {}, nbytes, version, where=where, leaf=leaf.path,
        fail=lambda message: _fail(where, name, f"chunk {j}: {message}", leaf.path),
    )
    size = nbytes if stored is None else stored
    if file >= len(files) or offset + size > files[file].nbytes:
        raise _fail(where, name, f"chunk {j} lies outside its data file", leaf.path)
    if nbytes != math.prod(box) * dtypes.dtype_from_name(leaf.dtype).itemsize:
        raise _fail(where, name, f"chunk {j} size does not match its shape", leaf.path)
    layout = manifest.layouts[leaf.cells.layout]
    block = leaf.cells.block
    cell = tuple(s // b for s, b in zip(start, block))
    cbox = cell_box(leaf.shape, block, cell)
    if any(k >= g for k, g in zip(cell, layout.grid)) or any(
        s + n > c0 + cn for s, n, c0, cn in zip(start, box, *cbox)
    ):
        raise _fail(where, name, f"chunk {j} lies outside the cell it starts in", leaf.path)
    k = linear(cell, layout.grid)
    if writer_of(layout, leaf.cells.rotation, k) != ref.process or is_shared(
        layout, k
    ) != ref.shared:
        raise _fail(where, name, f"chunk {j} belongs to a cell this table does not hold",
                    leaf.path)
    crc_block, crcs = parse_block_crcs(
        entry[7] if len(entry) == 8 else {}, nbytes, codec,
        lambda message: _fail(where, name, f"chunk {j}: {message}", leaf.path),
    )
    chunk = Chunk(file, offset, nbytes, tuple(start), tuple(box), crc, codec, stored, digest,
                  crc_block, crcs)
    return leaf_index, chunk


def _read_table(storage: Storage, directory: str, ref: TableRef, where: str) -> bytes:
    from keepax._src.format import datafiles as format  # noqa: PLC0415 - format imports this module's users

    path = f"{directory}/{ref.name}"
    try:
        reader = storage.open(path)
    except FileNotFoundError:
        raise _fail(where, ref.name, "it is missing") from None
    try:
        if reader.size() != ref.nbytes:
            raise _fail(where, ref.name, f"it has {reader.size()} bytes, the manifest says "
                                         f"{ref.nbytes}")
        out = bytearray(ref.nbytes)
        n = reader.read_into(0, memoryview(out))
    finally:
        reader.close()
    if n != ref.nbytes or format.checksum(bytes(out)) != ref.crc32c:
        raise _fail(where, ref.name, "it does not match its checksum in the manifest")
    return bytes(out)


def needed_cells(manifest: Manifest, needs: Mapping[int, Sequence[Box]]) -> dict[int, set[int]]:
    """Per leaf, the linear indices of the cells the given boxes overlap."""
    out: dict[int, set[int]] = {}
    for index, boxes in needs.items():
        leaf = manifest.leaves[index]
        if not isinstance(leaf, ArrayLeaf) or leaf.cells is None:
            continue
        grid = manifest.layouts[leaf.cells.layout].grid
        cells: set[int] = set()
        for box in boxes:
            cells.update(linear(c, grid) for c in cells_of(leaf.shape, leaf.cells.block, box))
        out[index] = cells
    return out


def resolve(
    storage: Storage,
    directory: str,
    where: str,
    manifest: Manifest,
    needs: Mapping[int, Sequence[Box]],
    *,
    workers: int = 8,
) -> tuple[Manifest, int]:
    """Fills in the chunks of the leaves a reader needs, reading only the tables it must.

    Args:
      storage: Where the checkpoint is.
      directory: The checkpoint's path in ``storage``.
      where: The checkpoint's display path, for errors.
      manifest: A validated manifest; returned unchanged if it has inline chunks.
      needs: Per array leaf index, the boxes the reader will fill.
      workers: Tables read concurrently.

    Returns:
      A manifest whose ``files`` are the data files of the tables read and whose needed leaves
      carry their chunks (other leaves carry none), and the bytes of tables read.

    Raises:
      CorruptCheckpointError: a table is missing, damaged, or does not cover a needed cell.
      KeepaxError: a needed cell is not in this directory (a host-local checkpoint holds only
        the shards its own process wrote).
    """
    if not manifest.tables:
        return manifest, 0
    cells = needed_cells(manifest, needs)
    by_process = {(t.process, t.shared): t for t in manifest.tables}
    wanted: set[tuple[int, bool]] = set()
    for index, indices in cells.items():
        leaf = manifest.leaves[index]
        assert isinstance(leaf, ArrayLeaf) and leaf.cells is not None
        layout = manifest.layouts[leaf.cells.layout]
        for k in indices:
            w = writer_of(layout, leaf.cells.rotation, k)
            if w is None:
                raise KeepaxError(
                    f"shard {k} of this array is not stored in this directory: a host-local "
                    "checkpoint holds only the shards its own process held when saving; restore "
                    "with the same processes and mesh",
                    path=where, leaf=leaf.path,
                )
            table = (w, is_shared(layout, k))
            if table not in by_process:
                raise CorruptCheckpointError(
                    f"no chunk table of process {w} is listed in the manifest", path=where,
                    leaf=leaf.path,
                )
            wanted.add(table)
    refs = [by_process[p] for p in sorted(wanted)]

    def load(ref: TableRef) -> _Table:
        return _parse_table(_read_table(storage, directory, ref, where), ref, manifest, where)

    if len(refs) <= 1:
        loaded = [load(r) for r in refs]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(refs))) as pool:
            loaded = list(pool.map(load, refs))

    check_save_ids([r.name for r in refs], [t.save_id for t in loaded], where)
    files, per_leaf = _merge(refs, loaded, cells, where)
    leaves = list(manifest.leaves)
    for index, indices in cells.items():
        leaf = leaves[index]
        assert isinstance(leaf, ArrayLeaf) and leaf.cells is not None
        kept = _cover_cells(leaf, manifest.layouts[leaf.cells.layout].grid, indices,
                            per_leaf.get(index, []), where)
        leaves[index] = dataclasses.replace(leaf, chunks=tuple(kept))
    nbytes = sum(r.nbytes for r in refs)
    return dataclasses.replace(manifest, files=tuple(files), leaves=tuple(leaves)), nbytes


def read_tables(storage: Storage, directory: str, where: str, manifest: Manifest,
                processes: Collection[int] | None = None) -> Manifest:
    """The manifest with the files and chunks listed by the tables of ``processes`` (None:
    every process's), unchecked for coverage: what a chunk store counts (§15).

    Raises:
      CorruptCheckpointError: A table read is missing or damaged.
    """
    refs = [t for t in manifest.tables if processes is None or t.process in processes]
    loaded = [_parse_table(_read_table(storage, directory, r, where), r, manifest, where)
              for r in refs]
    check_save_ids([r.name for r in refs], [t.save_id for t in loaded], where)
    every = {i: set[int]() for i in range(len(manifest.leaves))}
    files, per_leaf = _merge(refs, loaded, every, where)
    leaves = [dataclasses.replace(leaf, chunks=tuple(per_leaf.get(i, ())))
              if isinstance(leaf, ArrayLeaf) else leaf for i, leaf in enumerate(manifest.leaves)]
    return dataclasses.replace(manifest, files=tuple(files), leaves=tuple(leaves))


def _merge(
    refs: Sequence[TableRef], loaded: Sequence[_Table], cells: Mapping[int, set[int]], where: str
) -> tuple[list[DataFile], dict[int, list[Chunk]]]:
    """One list of data files for the tables read (chunks renumbered into it), and the
    chunks of the needed leaves."""
    files: list[DataFile] = []
    per_leaf: dict[int, list[Chunk]] = {}
    seen: dict[str, tuple[int, int]] = {}  # name -> (index in files, process)
    for ref, parsed in zip(refs, loaded):
        # A process's two tables share its data files; no two processes share one.
        mapping = []
        for f in parsed.files:
            known = seen.get(f.name)
            if known is None:
                seen[f.name] = (len(files), ref.process)
                mapping.append(len(files))
                files.append(f)
            elif known[1] != ref.process or files[known[0]] != f:
                raise CorruptCheckpointError(
                    f"data file {f.name} is listed by two chunk tables that disagree",
                    path=where,
                )
            else:
                mapping.append(known[0])
        for index, chunks in parsed.chunks.items():
            if index in cells:
                per_leaf.setdefault(index, []).extend(
                    dataclasses.replace(c, file=mapping[c.file]) for c in chunks
                )
    return files, per_leaf


def _cover_cells(
    leaf: ArrayLeaf, grid: Sequence[int], indices: set[int], chunks: Sequence[Chunk], where: str
) -> list[Chunk]:
    """The chunks of the needed cells, checked to cover each exactly (sizes first)."""
    assert leaf.cells is not None
    volume: dict[int, int] = {}
    kept = []
    for c in chunks:
        k = linear(tuple(s // b for s, b in zip(c.start, leaf.cells.block)), grid)
        if k in indices:
            volume[k] = volume.get(k, 0) + math.prod(c.shape)
            kept.append(c)
    regions = []
    for k in indices:
        cell = _unravel(k, grid)
        region = cell_box(leaf.shape, leaf.cells.block, cell)
        want = math.prod(region[1])
        if volume.get(k, 0) != want:
            raise CorruptCheckpointError(
                f"the chunk tables cover {volume.get(k, 0)} of the {want} elements of shard "
                f"{list(cell)}; the checkpoint is damaged",
                path=where, leaf=leaf.path,
            )
        regions.append(region)
    if not covers_exactly([(c.start, c.shape) for c in kept], regions):
        raise CorruptCheckpointError("chunks of the array overlap", path=where, leaf=leaf.path)
    return kept


def _unravel(index: int, grid: Sequence[int]) -> tuple[int, ...]:
    out = []
    for g in reversed(grid):
        out.append(index % g)
        index //= g
    return tuple(reversed(out))
