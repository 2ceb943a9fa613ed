"""Array bytes <-> data files: safetensors layout, CRC-32C per chunk, parallel I/O.

Each data file is a valid safetensors file: an 8-byte little-endian header length, a JSON
header (padded with spaces so that data starts on a 64-byte boundary) naming every chunk as a
tensor, then the chunks back to back. Our manifest records each chunk's absolute offset, so
readers never need the safetensors header; it is there for other tools.

Writing streams each chunk from the caller's memory (no staging copy for C-contiguous data),
checksumming it just before it is written; small chunks are gathered into one ``writev``.
Reading is :mod:`keepax._src.format.reading`; the header checks of ``verify`` are here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import crc32c as _crc32c
import numpy as np

from keepax._src.format import blocks, codecs, dtypes, spec
from keepax._src.format.codecs import Compression
from keepax._src.format.manifest import (
    ArrayLeaf,
    Chunk,
    DataFile,
    Manifest,
    compact_json,
    raw_chunk,
)
from keepax._src.io.base import Reader, Storage, Writer
from keepax._src.util import gc_paused

__all__ = [
    "ChunkSource",
    "checksum",
    "write_data_files",
    "safetensors_header",
    "header_json",
    "pad_header",
    "tensor_name",
    "check_header",
    "check_headers",
    "MAX_HEADER_BYTES",
]

CHUNK_BYTES = 64 << 20
"""Arrays larger than this are split into several chunks (along their first axis)."""

_ALIGN = 64
MAX_HEADER_BYTES = 100_000_000
"""The longest safetensors header readers accept (the limit safetensors itself applies)."""
_SMALL = 256 << 10  # chunks below this are gathered into one writev
_BATCH_BYTES = 16 << 20  # at most this much gathered into one writev
_COPY_BLOCK = 8 << 20  # non-contiguous sources are copied out in blocks of about this size
_TAP_BLOCK = 1 << 20  # a tapped chunk is checksummed, tapped and written in blocks of this


def checksum(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``value``); releases the GIL on large buffers."""
    return _crc32c.crc32c(data, value)


def bytes_view(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (any dtype, including ml_dtypes)."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


@dataclasses.dataclass
class ChunkSource:
    """A chunk to write.

    Attributes:
      leaf: Index of the leaf the chunk belongs to.
      name: Tensor name in the safetensors header.
      start: Box start in the global array.
      shape: Box shape.
      dtype: The array's dtype.
      data: Returns the chunk's values as a NumPy array of ``shape`` (any memory layout);
        called once, by the thread that writes the chunk.
      tap: If set, shown every byte of the chunk, in order, block by block as it is written
        (while the block is in cache), e.g. to digest it in the same pass; uncompressed only.
    """

    leaf: int
    name: str
    start: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    data: Callable[[], np.ndarray]
    tap: Callable[[memoryview], None] | None = None

    @functools.cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_name(path: str, start: Sequence[int], shape: Sequence[int],
                array_shape: Sequence[int]) -> str:
    """A chunk's tensor name in a data file's header (docs/FORMAT.md §7): the leaf's key path
    (``<root>`` for a root leaf), plus ``@`` and its start indices unless it is the whole
    array."""
    name = path or "<root>"
    if tuple(shape) == tuple(array_shape):
        return name
    return f"{name}@{','.join(map(str, start))}"


def _entries(tensors: Sequence[tuple[str, np.dtype | None, Sequence[int], int]]
             ) -> dict[str, Any]:
    """Safetensors tensor entries for (name, dtype, shape, nbytes), back to back from 0: a dtype
    without a safetensors code (or None: an encoded chunk, §5.4) is declared as a flat ``U8``
    byte string."""
    entries: dict[str, Any] = {}
    offset = 0
    codes: dict[np.dtype | None, str | None] = {None: None}
    for name, dtype, shape, nbytes in tensors:
        try:
            code = codes[dtype]
        except KeyError:
            code = codes[dtype] = dtypes.safetensors_code(dtype)  # type: ignore[arg-type]
        end = offset + nbytes
        entries[name] = {  # (tuples are written as JSON arrays)
            "dtype": code or "U8",
            "shape": shape if code is not None else (nbytes,),
            "data_offsets": (offset, end),
        }
        offset = end
    return entries


def header_json(metadata: dict[str, str], sources: Sequence[ChunkSource],
                stored: Sequence[int | None] | None = None) -> bytes:
    """The safetensors header JSON (unpadded): ``__metadata__`` first, then one tensor per
    chunk, in file order. The one writer of safetensors headers (data files, single files).

    Args:
      stored: Per source, its stored size when encoded (declared as ``U8``), else None.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    sizes = [None] * len(sources) if stored is None else stored
    header.update(_entries([(s.name, s.dtype, s.shape, s.nbytes) if n is None
                            else (s.name, None, (n,), n) for s, n in zip(sources, sizes)]))
    return compact_json(header)


def pad_header(text: bytes, length: int | None = None) -> bytes:
    """Length prefix + header padded with spaces to ``length`` bytes (by default the least
    length with data starting on a 64-byte boundary)."""
    if length is None:
        length = len(text) + (-(8 + len(text))) % _ALIGN
    return struct.pack("<Q", length) + text + b" " * (length - len(text))


@gc_paused()
def safetensors_header(sources: Sequence[ChunkSource], file_tag: str,
                       stored: Sequence[int | None] | None = None) -> bytes:
    """Builds the length-prefixed, 64-byte-aligned safetensors header of a data file
    (``stored``: as :func:`header_json`)."""
    metadata = {
        "format": spec.FORMAT_NAME,
        "format_version": spec.version_text(spec.FORMAT_VERSION),
        "file": file_tag,
    }
    return pad_header(header_json(metadata, sources, stored))


def _plan_files(sources: Sequence[ChunkSource], max_files: int) -> list[list[ChunkSource]]:
    """Spreads chunks over at most ``max_files`` files of about equal size, keeping leaf order
    within each file."""
    total = sum(s.nbytes for s in sources)
    nfiles = max(1, min(max_files, len(sources), math.ceil(total / (CHUNK_BYTES))))
    if nfiles == 1:
        return [list(sources)]
    loads = [0] * nfiles
    assigned: list[list[tuple[int, ChunkSource]]] = [[] for _ in range(nfiles)]
    for order, source in sorted(enumerate(sources), key=lambda p: -p[1].nbytes):
        target = loads.index(min(loads))
        loads[target] += source.nbytes
        assigned[target].append((order, source))
    return [[s for _, s in sorted(group, key=lambda p: p[0])] for group in assigned if group]


_Crcs = tuple[int, int, tuple[int, ...]]
"""A chunk's CRC-32C, block size (0: none) and block CRC-32Cs."""


def _write_one(
    writer: Writer, sources: Sequence[ChunkSource], header: bytes, block_crcs: bool = False
) -> list[_Crcs]:
    """Writes header then chunks; returns each chunk's checksums."""
    crcs: list[_Crcs] = []
    gathered = _Gathered(writer, memoryview(header))
    crc32c = _crc32c.crc32c
    small = _SMALL if not block_crcs else 0
    for source in sources:
        array = source.data()
        if array.shape != source.shape:
            raise ValueError(f"chunk {source.name}: got shape {array.shape}, want {source.shape}")
        nbytes = array.nbytes
        if nbytes < small and array.flags.c_contiguous and source.tap is None:
            # The common small chunk (what follows, without its branches): gathered. A
            # memoryview cast is 4x cheaper than a uint8 view, for dtypes with a buffer
            # format (NumPy's own, native byte order; not ml_dtypes').
            if array.dtype.isbuiltin == 1:
                view = memoryview(array).cast("B")  # type: ignore[arg-type]
            else:
                view = memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            crcs.append((crc32c(view), 0, ()))
            views = gathered.views  # gathered.add(view), inline
            views.append(view)
            gathered.nbytes += nbytes
            if gathered.nbytes >= _BATCH_BYTES or len(views) >= 1024:
                gathered.flush()
            continue
        size = blocks.crc32c_block_size(source.shape, source.dtype.itemsize) if block_crcs else 0
        crcs_of = blocks.BlockCrcs(size) if size else None
        if array.flags.c_contiguous and source.tap is not None:
            gathered.flush()
            crcs.append(_write_tapped(writer, bytes_view(array), source.tap, size, crcs_of))
            continue
        if array.flags.c_contiguous:
            view = bytes_view(array)
            if crcs_of is not None:
                crcs_of.feed(view)
            crcs.append((checksum(view), size, crcs_of.finish() if crcs_of is not None else ()))
            if len(view) >= _SMALL:
                gathered.flush()
                writer.write(view)
            else:
                gathered.add(view)
            continue
        # Non-contiguous (strided, Fortran-ordered, ...): copy out in bounded row blocks.
        gathered.flush()
        row_bytes = max(1, array[:1].nbytes if array.ndim else array.nbytes)
        rows = max(1, _COPY_BLOCK // row_bytes)
        crc = 0
        for r in range(0, array.shape[0], rows):
            block = np.ascontiguousarray(array[r : r + rows])
            view = bytes_view(block)
            crc = checksum(view, crc)
            if crcs_of is not None:
                crcs_of.feed(view)
            if source.tap is not None:
                source.tap(view)
            writer.write(view)
            del block, view  # before the next block is copied: one block held at a time
        crcs.append((crc, size, crcs_of.finish() if crcs_of is not None else ()))
    gathered.flush()
    return crcs


def _write_tapped(writer: Writer, view: memoryview, tap: Callable[[memoryview], None],
                  size: int, crcs_of: blocks.BlockCrcs | None) -> _Crcs:
    """Writes a tapped chunk block by block, each block checksummed, tapped and written while
    it is still in cache (the chunk is read from memory once)."""
    crc = 0
    for at in range(0, len(view), _TAP_BLOCK):
        block = view[at : at + _TAP_BLOCK]
        crc = checksum(block, crc)
        if crcs_of is not None:
            crcs_of.feed(block)
        tap(block)
        writer.write(block)
    return crc, size, crcs_of.finish() if crcs_of is not None else ()


class _Gathered:
    """Small chunks gathered into vectored writes (of at most ``_BATCH_BYTES`` or 1,024
    pieces each), in order with the writes made around them."""

    def __init__(self, writer: Writer, first: memoryview) -> None:
        self.writer, self.views, self.nbytes = writer, [first], len(first)

    def add(self, view: memoryview) -> None:
        self.views.append(view)
        self.nbytes += len(view)
        if self.nbytes >= _BATCH_BYTES or len(self.views) >= 1024:
            self.flush()

    def flush(self) -> None:
        if self.views:
            self.writer.writev(self.views)
            self.views, self.nbytes = [], 0


def _close(writer: Writer) -> None:
    writer.close()  # (not ``Writer.close``: that is the abstract method, not the override)


def write_data_files(
    storage: Storage,
    directory: str,
    sources: Sequence[ChunkSource],
    *,
    prefix: str,
    max_files: int = 4,
    workers: int = 4,
    block_crcs: bool = False,
    compression: Compression | None = None,
    closer: Callable[[Writer], None] | None = None,
) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]]]:
    """Writes chunks into a few data files, in parallel, each made durable before returning
    (or handed, written, to ``closer``).

    Args:
      storage: Where to write.
      directory: The (staging) checkpoint directory, relative to the storage root.
      sources: The chunks, in leaf order.
      prefix: File name prefix, unique per writing process (``p00000``).
      max_files: At most this many files.
      workers: Threads writing files concurrently.
      block_crcs: Also checksum large chunks block by block (format 1.2, docs/FORMAT.md
        §5.4), so that readers needing part of a chunk read only that part.
      compression: Compress each chunk (in parallel, across cores), keeping it raw where that
        does not make it smaller; files then hold at most ``_PACK_BYTES`` logical bytes each.
      closer: Takes each fully written file's writer in place of closing it here: the caller
        then closes it (``Writer.close`` makes the file durable), e.g. on another thread while
        it builds the manifest, and must do so before the commit.

    Returns:
      The files written (names relative to the checkpoint) and, per leaf index, its chunks
      with their file index (into the returned list), offset and checksum.
    """
    if compression is not None:
        return _write_compressed(storage, directory, sources, prefix, compression,
                                 closer or _close)
    close = closer or _close
    groups = _plan_files(sources, max_files)
    names = [f"data/{prefix}-{i:03d}.safetensors" for i in range(len(groups))]
    headers = [safetensors_header(g, f"{prefix}-{i:03d}") for i, g in enumerate(groups)]

    def write(i: int) -> list[_Crcs]:
        writer = storage.create(f"{directory}/{names[i]}")
        try:
            crcs = _write_one(writer, groups[i], headers[i], block_crcs)
        except BaseException:
            writer.abort()
            raise
        close(writer)
        return crcs

    if len(groups) == 1:
        all_crcs = [write(0)]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(groups))) as pool:
            all_crcs = list(pool.map(write, range(len(groups))))

    files = []
    chunks: dict[int, list[tuple[ChunkSource, Chunk]]] = {}
    for i, (group, header, crcs) in enumerate(zip(groups, headers, all_crcs)):
        offset = len(header)
        for source, (crc, size, per_block) in zip(group, crcs):
            chunk = raw_chunk(i, offset, source.nbytes, source.start, source.shape, crc, size,
                              per_block)
            chunks.setdefault(source.leaf, []).append((source, chunk))
            offset += source.nbytes
        files.append(DataFile(names[i], offset))
    return files, chunks


_PACK_BYTES = 64 << 20
"""Compressed saves: logical bytes per data file (a file's header needs the stored sizes of its
chunks before they are written, so each file's chunks are compressed, held, then written)."""
_PACKS_IN_FLIGHT = 2  # compressed data files being compressed or written at once
_THREADED = 4 << 20  # chunks at least this big are compressed by several threads each


def _packs(sources: Sequence[ChunkSource]) -> list[list[ChunkSource]]:
    """Cuts the chunks, in order, into files of at most ``_PACK_BYTES`` (or one chunk)."""
    packs: list[list[ChunkSource]] = []
    size = 0
    for source in sources:
        if not packs or (size + source.nbytes > _PACK_BYTES and packs[-1]):
            packs.append([])
            size = 0
        packs[-1].append(source)
        size += source.nbytes
    return packs


def _encode(source: ChunkSource, compression: Compression, threads: int
            ) -> tuple[list[memoryview], int, str]:
    """A chunk's stored bytes (in pieces), their CRC-32C and its codec."""
    array = source.data()
    if array.shape != source.shape:
        raise ValueError(f"chunk {source.name}: got shape {array.shape}, want {source.shape}")
    view = bytes_view(np.ascontiguousarray(array))
    packed = (codecs.compress(view, compression, threads if len(view) >= _THREADED else 0,
                              source.dtype.itemsize) if len(view) else None)
    pieces, codec = packed if packed is not None else ([view], "raw")
    crc = 0
    for piece in pieces:
        crc = checksum(piece, crc)
    return pieces, crc, codec


def _write_compressed(
    storage: Storage, directory: str, sources: Sequence[ChunkSource], prefix: str,
    compression: Compression, close: Callable[[Writer], None],
) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]]]:
    """:func:`write_data_files` with compression: files of at most ``_PACK_BYTES``, each
    compressed (small chunks side by side, big ones by several threads) then written; at most
    ``_PACKS_IN_FLIGHT`` files' stored bytes are held at once."""
    packs = _packs(sources)
    names = [f"data/{prefix}-{i:03d}.safetensors" for i in range(len(packs))]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)

    def write(i: int) -> DataFile:
        pack = packs[i]
        encoded = list(pool.map(lambda s: _encode(s, compression, cores), pack))
        sizes = [sum(map(len, pieces)) for pieces, _, _ in encoded]
        stored = [None if codec == "raw" else size
                  for size, (_, _, codec) in zip(sizes, encoded)]
        header = safetensors_header(pack, f"{prefix}-{i:03d}", stored)
        writer = storage.create(f"{directory}/{names[i]}")
        try:
            views = [memoryview(header)] + [p for pieces, _, _ in encoded for p in pieces]
            for b in range(0, len(views), 1024):
                writer.writev(views[b : b + 1024])
        except BaseException:
            writer.abort()
            raise
        close(writer)
        offset = len(header)
        for source, size, (_, crc, codec) in zip(pack, sizes, encoded):
            chunk = Chunk(i, offset, source.nbytes, source.start, source.shape, crc, codec,
                          None if codec == "raw" else size)
            chunks.setdefault(source.leaf, []).append((source, chunk))
            offset += size
        return DataFile(names[i], offset)

    chunks: dict[int, list[tuple[ChunkSource, Chunk]]] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, cores)) as pool, \
            concurrent.futures.ThreadPoolExecutor(_PACKS_IN_FLIGHT) as files_pool:
        files = list(files_pool.map(write, range(len(packs))))
    for pairs in chunks.values():
        pairs.sort(key=lambda pair: (pair[1].file, pair[1].offset))
    return files, chunks


def read_header(reader: Reader, size: int) -> tuple[int, Any]:
    """Reads a safetensors header: (its length H, the parsed JSON).

    Raises:
      ValueError: the file is too short, ``H`` exceeds the file or ``MAX_HEADER_BYTES``, or
        the header is not JSON (a message saying which).
    """
    prefix = bytearray(8)
    if size < 8 or reader.read_into(0, memoryview(prefix)) != 8:
        raise ValueError(f"the file has {size} bytes, too few for a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8:
        raise ValueError(f"the header is {length} bytes long but the file has {size - 8} after "
                         "its length (truncated?)")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {length} bytes long, above {MAX_HEADER_BYTES}")
    raw = bytearray(length)
    if reader.read_into(8, memoryview(raw)) != length:
        raise ValueError("the file ends inside its header")
    try:
        return length, spec.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"the safetensors header is not valid JSON ({e})") from e


def check_header(
    reader: Reader,
    file: DataFile,
    chunks: Sequence[tuple[ArrayLeaf, Chunk]],
    *,
    expected_format: str = spec.FORMAT_NAME,
) -> list[str]:
    """Checks that a data file's safetensors header matches the manifest: one tensor per chunk
    (names, dtype codes, shapes and offsets as docs/FORMAT.md §7 defines them), nothing else,
    and a data area a safetensors reader accepts. Keepax itself never reads these headers;
    other tools do (``safetensors.safe_open``).

    Args:
      reader: The data file, open.
      file: Its manifest entry (the size is assumed checked).
      chunks: Every chunk the manifest places in this file, with its leaf.
      expected_format: ``__metadata__.format``: ``keepax`` (data files) or ``keepax-file``.

    Returns:
      One message per problem, each naming the file (empty when the header matches).
    """
    where = f"{file.name}: safetensors header"
    try:
        length, header = read_header(reader, file.nbytes)
    except ValueError as e:
        return [f"{where}: {e}"]
    if not isinstance(header, dict):
        return [f"{where}: not a JSON object"]
    problems: list[str] = []
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        problems.append(f"{where}: __metadata__ is not an object of strings")
    elif meta.get("format") != expected_format:
        problems.append(f"{where}: __metadata__.format is {meta.get('format')!r:.40}, expected "
                        f"{expected_format!r}")
    base = 8 + length
    ordered = sorted(chunks, key=lambda pair: pair[1].offset)
    expected: dict[str, Any] = {}
    end = 0
    for leaf, c in ordered:
        dtype = dtypes.dtype_from_name(leaf.dtype)
        name = tensor_name(leaf.path, c.start, c.shape, leaf.shape)
        begin = c.offset - base
        if begin != end:
            problems.append(f"{where}: {name} starts at data offset {begin}, expected {end} "
                            "(safetensors needs the tensors back to back)")
        entry = _entries([(name, dtype, c.shape, c.stored) if c.codec == "raw"
                          else (name, None, (c.stored,), c.stored)])[name]
        entry["data_offsets"] = [begin, begin + c.stored]
        entry["shape"] = list(entry["shape"])  # as parsed from JSON
        if name in expected:
            problems.append(f"{where}: two chunks are named {name}")
        expected[name] = entry
        end = begin + c.stored
    if end != file.nbytes - base:
        problems.append(f"{where}: the tensors end at data offset {end}, the file's data area "
                        f"has {file.nbytes - base} bytes")
    for name, want in expected.items():
        got = header.get(name)
        if got != want:
            problems.append(f"{where}: tensor {name} is {json.dumps(got)[:200]}, the manifest "
                            f"says {json.dumps(want)}")
    extra = sorted(k for k in header if k != "__metadata__" and k not in expected)
    if extra:
        problems.append(f"{where}: {len(extra)} tensor(s) not in the manifest, e.g. "
                        f"{extra[0][:100]!r}")
    return problems


def check_headers(
    storage: Storage, directory: str, manifest: Manifest, *, where: str
) -> list[str]:
    """:func:`check_header` for every data file of a manifest whose chunks are listed (for
    chunk tables: resolved). Files that are missing or of the wrong size are skipped: checking
    chunks reports them.

    Returns:
      One message per problem, prefixed with the checkpoint ``where``.
    """
    per_file: dict[int, list[tuple[ArrayLeaf, Chunk]]] = {i: [] for i in range(len(manifest.files))}
    for leaf in manifest.leaves:
        if isinstance(leaf, ArrayLeaf):
            for c in leaf.chunks:
                per_file[c.file].append((leaf, c))
    problems: list[str] = []
    for index, chunks in per_file.items():
        file = manifest.files[index]
        if spec.is_store_ref(file.name):
            continue  # a chunk store file's header names the chunks of the save that wrote it
        try:
            reader = storage.open(f"{directory}/{file.name}")
        except FileNotFoundError:
            continue
        try:
            if reader.size() == file.nbytes:
                problems.extend(f"{where}: {p}" for p in check_header(reader, file, chunks))
        finally:
            reader.close()
    return problems
