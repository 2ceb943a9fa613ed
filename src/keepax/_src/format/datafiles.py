"""Array bytes <-> data files: safetensors layout, CRC-32C per chunk, parallel I/O.

Each data file is a valid safetensors file: an 8-byte little-endian header length, a JSON
header (padded with spaces so that data starts on a 64-byte boundary) naming every chunk as a
tensor, then the chunks back to back. Our manifest records each chunk's absolute offset, so
readers never need the safetensors header; it is there for other tools.

Writing streams each chunk from the caller's memory (no staging copy for C-contiguous data),
checksumming it just before it is written; small chunks are gathered into one ``writev``.
Reading fills the caller's output arrays directly when a chunk is a contiguous slab of them,
coalesces small chunks into one read, and verifies every chunk's checksum.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import crc32c as _crc32c
import numpy as np

from keepax._src.format import dtypes, spec
from keepax._src.format.boxes import Box, intersect, local_slices
from keepax._src.format.manifest import ArrayLeaf, Chunk, DataFile, Manifest
from keepax._src.io.base import Reader, Storage, Writer
from keepax._src.util import gc_paused
from keepax.errors import CorruptCheckpointError

__all__ = [
    "ChunkSource",
    "ReadRequest",
    "RestoreStats",
    "checksum",
    "write_data_files",
    "read_requests",
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
_SMALL = 256 << 10  # chunks below this are gathered (writes) or coalesced (reads)
_BATCH_BYTES = 16 << 20  # at most this much gathered into one writev / coalesced read
_COPY_BLOCK = 8 << 20  # non-contiguous sources are copied out in blocks of about this size
_RUN_BYTES = 256 << 20  # consecutive big chunks read with one vectored request, up to this


def checksum(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``value``); releases the GIL on large buffers."""
    return _crc32c.crc32c(data, value)


def _bytes_view(array: np.ndarray) -> memoryview:
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
    """

    leaf: int
    name: str
    start: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    data: Callable[[], np.ndarray]

    @property
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


def _entries(tensors: Sequence[tuple[str, np.dtype, Sequence[int], int]]) -> dict[str, Any]:
    """Safetensors tensor entries for (name, dtype, shape, nbytes), back to back from 0: a dtype
    without a safetensors code is declared as a flat ``U8`` byte string."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        code = dtypes.safetensors_code(dtype)
        entries[name] = {
            "dtype": code or "U8",
            "shape": list(shape) if code is not None else [nbytes],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return entries


def header_json(metadata: dict[str, str], sources: Sequence[ChunkSource]) -> bytes:
    """The safetensors header JSON (unpadded): ``__metadata__`` first, then one tensor per
    chunk, in file order. The one writer of safetensors headers (data files, single files)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    header.update(_entries([(s.name, s.dtype, s.shape, s.nbytes) for s in sources]))
    return json.dumps(header, separators=(",", ":")).encode("ascii")


def pad_header(text: bytes, length: int | None = None) -> bytes:
    """Length prefix + header padded with spaces to ``length`` bytes (by default the least
    length with data starting on a 64-byte boundary)."""
    if length is None:
        length = len(text) + (-(8 + len(text))) % _ALIGN
    return struct.pack("<Q", length) + text + b" " * (length - len(text))


@gc_paused()
def safetensors_header(sources: Sequence[ChunkSource], file_tag: str) -> bytes:
    """Builds the length-prefixed, 64-byte-aligned safetensors header of a data file."""
    metadata = {
        "format": spec.FORMAT_NAME,
        "format_version": spec.version_text(spec.FORMAT_VERSION),
        "file": file_tag,
    }
    return pad_header(header_json(metadata, sources))


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


def _write_one(writer: Writer, sources: Sequence[ChunkSource], header: bytes) -> list[int]:
    """Writes header then chunks; returns each chunk's CRC-32C."""
    crcs: list[int] = []
    pending: list[memoryview] = [memoryview(header)]
    pending_bytes = len(header)
    for source in sources:
        array = source.data()
        if array.shape != source.shape:
            raise ValueError(f"chunk {source.name}: got shape {array.shape}, want {source.shape}")
        if array.flags.c_contiguous:
            view = _bytes_view(array)
            crcs.append(checksum(view))
            if len(view) >= _SMALL:
                if pending:
                    writer.writev(pending)
                    pending, pending_bytes = [], 0
                writer.write(view)
            else:
                pending.append(view)
                pending_bytes += len(view)
                if pending_bytes >= _BATCH_BYTES or len(pending) >= 1024:
                    writer.writev(pending)
                    pending, pending_bytes = [], 0
            continue
        # Non-contiguous (strided, Fortran-ordered, ...): copy out in bounded row blocks.
        if pending:
            writer.writev(pending)
            pending, pending_bytes = [], 0
        row_bytes = max(1, array[:1].nbytes if array.ndim else array.nbytes)
        rows = max(1, _COPY_BLOCK // row_bytes)
        crc = 0
        for r in range(0, array.shape[0], rows):
            block = np.ascontiguousarray(array[r : r + rows])
            view = _bytes_view(block)
            crc = checksum(view, crc)
            writer.write(view)
        crcs.append(crc)
    if pending:
        writer.writev(pending)
    return crcs


def write_data_files(
    storage: Storage,
    directory: str,
    sources: Sequence[ChunkSource],
    *,
    prefix: str,
    max_files: int = 4,
    workers: int = 4,
) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]]]:
    """Writes chunks into a few data files, in parallel, each made durable before returning.

    Args:
      storage: Where to write.
      directory: The (staging) checkpoint directory, relative to the storage root.
      sources: The chunks, in leaf order.
      prefix: File name prefix, unique per writing process (``p00000``).
      max_files: At most this many files.
      workers: Threads writing files concurrently.

    Returns:
      The files written (names relative to the checkpoint) and, per leaf index, its chunks
      with their file index (into the returned list), offset and checksum.
    """
    groups = _plan_files(sources, max_files)
    names = [f"data/{prefix}-{i:03d}.safetensors" for i in range(len(groups))]
    headers = [safetensors_header(g, f"{prefix}-{i:03d}") for i, g in enumerate(groups)]

    def write(i: int) -> list[int]:
        writer = storage.create(f"{directory}/{names[i]}")
        try:
            crcs = _write_one(writer, groups[i], headers[i])
        except BaseException:
            writer.abort()
            raise
        writer.close()
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
        for source, crc in zip(group, crcs):
            chunk = Chunk(i, offset, source.nbytes, source.start, source.shape, crc)
            chunks.setdefault(source.leaf, []).append((source, chunk))
            offset += source.nbytes
        files.append(DataFile(names[i], offset))
    return files, chunks


@dataclasses.dataclass
class ReadRequest:
    """Fill ``out`` (a C-contiguous array holding box ``box`` of a leaf) from that leaf's
    chunks.

    Attributes:
      leaf: The leaf's key path, for error messages.
      chunks: The leaf's chunks (all of them; only those overlapping ``box`` are read).
      box: The box of the global array that ``out`` holds.
      out: Destination array, C-contiguous, of the leaf's stored dtype and ``box``'s shape.
    """

    leaf: str
    chunks: Sequence[Chunk]
    box: Box
    out: np.ndarray


@dataclasses.dataclass
class RestoreStats:
    """What a restore read.

    Attributes:
      bytes_read: Bytes read from data files (manifest and marker not included).
      chunks_read: Chunks read (and verified).
      files_opened: Data files opened.
      table_bytes_read: Bytes of per-process chunk tables read (multi-process checkpoints).
    """

    bytes_read: int = 0
    chunks_read: int = 0
    files_opened: int = 0
    table_bytes_read: int = 0


@dataclasses.dataclass
class _Piece:
    """One chunk to read (once), and every place its bytes go."""

    chunk: Chunk
    leaf: str
    targets: list[tuple[ReadRequest, memoryview | None]]  # (request, direct slab or None)

    def landing(self) -> memoryview | None:
        """A direct slab to read the chunk straight into, if some target has one."""
        return next((view for _, view in self.targets if view is not None), None)

    def deliver(self, data: memoryview, landed: memoryview | None = None) -> None:
        """Copies verified chunk bytes to every target except the slab they were read into."""
        for request, view in self.targets:
            if view is None:
                _scatter(request, self.chunk, data)
            elif view is not landed:
                view[:] = data


def _direct_view(request: ReadRequest, chunk: Chunk) -> memoryview | None:
    """The slab of ``request.out`` a chunk fills exactly, if it is contiguous there."""
    (start, shape), out = request.box, request.out
    if len(shape) == 0:
        return _bytes_view(out)
    if tuple(chunk.shape[1:]) != tuple(shape[1:]) or tuple(chunk.start[1:]) != tuple(start[1:]):
        return None
    if chunk.start[0] < start[0] or chunk.start[0] + chunk.shape[0] > start[0] + shape[0]:
        return None
    row = math.prod(shape[1:]) * out.dtype.itemsize
    begin = (chunk.start[0] - start[0]) * row
    return _bytes_view(out)[begin : begin + chunk.nbytes]


class _Files:
    """Opens data files lazily (once each) and checks their sizes against the manifest."""

    def __init__(self, storage: Storage, directory: str, files: Sequence[DataFile], where: str):
        self._storage, self._directory, self._files, self._where = storage, directory, files, where
        self._open: dict[int, Reader] = {}
        self._lock = threading.Lock()

    def get(self, index: int, stats: RestoreStats) -> Reader:
        with self._lock:
            reader = self._open.get(index)
            if reader is None:
                entry = self._files[index]
                try:
                    reader = self._storage.open(f"{self._directory}/{entry.name}")
                except FileNotFoundError as e:
                    raise CorruptCheckpointError(
                        f"data file {entry.name} is missing; the checkpoint is damaged",
                        path=self._where,
                    ) from e
                if reader.size() != entry.nbytes:
                    reader.close()
                    raise CorruptCheckpointError(
                        f"data file {entry.name} has {reader.size()} bytes, the manifest says "
                        f"{entry.nbytes}; the checkpoint is truncated or damaged",
                        path=self._where,
                    )
                self._open[index] = reader
                stats.files_opened += 1
            return reader

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


def _verify(view: memoryview, piece: _Piece, files: Sequence[DataFile], where: str) -> None:
    actual = checksum(view)
    if actual != piece.chunk.crc32c:
        chunk = piece.chunk
        raise CorruptCheckpointError(
            f"checksum mismatch in {files[chunk.file].name} at bytes "
            f"{chunk.offset}..{chunk.offset + chunk.nbytes} (chunk starting at {list(chunk.start)}"
            f", shape {list(chunk.shape)}): stored {chunk.crc32c:#010x}, read {actual:#010x}; "
            "the data file is damaged: restore an earlier checkpoint",
            path=where,
            leaf=piece.leaf,
        )


def _scatter(request: ReadRequest, chunk: Chunk, data: memoryview) -> None:
    """Copies a verified chunk's bytes into the part of a request's output it overlaps."""
    chunk_box = (chunk.start, chunk.shape)
    overlap = intersect(chunk_box, request.box)
    if overlap is None:
        return
    values = np.frombuffer(data, dtype=request.out.dtype).reshape(chunk.shape)
    request.out[local_slices(overlap, request.box)] = values[local_slices(overlap, chunk_box)]


def _sequential_streams(steps: list[Any], workers: int) -> list[list[Any]]:
    """Orders read steps into streams that each read one file front to back.

    Disks (and the kernel's readahead) serve a few sequential readers faster than many
    threads reading scattered chunks; with fewer files than workers, each file is split
    into a few contiguous runs so that checksums and page faults still overlap with I/O.
    """
    by_file: dict[int, list[Any]] = {}
    for step in sorted(steps, key=lambda s: (s[0], s[1])):
        by_file.setdefault(step[0], []).append(step)
    per_file = max(1, min(2, workers // max(1, len(by_file))))
    streams: list[list[Any]] = []
    for run in by_file.values():
        size = -(-len(run) // per_file)
        streams.extend(run[i : i + size] for i in range(0, len(run), size))
    return streams


def read_requests(
    storage: Storage,
    directory: str,
    files: Sequence[DataFile],
    requests: Sequence[ReadRequest],
    *,
    where: str,
    workers: int = 8,
) -> RestoreStats:
    """Reads and verifies the chunks that the requests need, filling their outputs.

    Raises:
      CorruptCheckpointError: a file is missing or has the wrong size, or a checksum fails.
    """
    stats = RestoreStats()
    by_chunk: dict[tuple[int, int], _Piece] = {}
    for request in requests:
        for chunk in request.chunks:
            if chunk.nbytes == 0 or intersect((chunk.start, chunk.shape), request.box) is None:
                continue
            piece = by_chunk.setdefault(
                (chunk.file, chunk.offset), _Piece(chunk, request.leaf, [])
            )
            piece.targets.append((request, _direct_view(request, chunk)))
    pieces = list(by_chunk.values())
    reading = _Reading(_Files(storage, directory, files, where), files, where, stats)
    streams = _sequential_streams(_read_steps(pieces, reading), workers)

    def run_stream(stream: list[tuple[int, int, Callable[[Any], int], Any]]) -> int:
        return sum(fn(arg) for _, _, fn, arg in stream)

    try:
        if len(streams) <= 1:
            total = sum(run_stream(stream) for stream in streams)
        else:
            with concurrent.futures.ThreadPoolExecutor(min(workers, len(streams))) as pool:
                total = sum(pool.map(run_stream, streams))
    finally:
        reading.opened.close()
    stats.bytes_read = total
    stats.chunks_read = len(pieces)
    return stats


@dataclasses.dataclass
class _Reading:
    """What the read steps of one :func:`read_requests` share."""

    opened: _Files
    files: Sequence[DataFile]
    where: str
    stats: RestoreStats

    def run(self, run: list[_Piece]) -> int:
        """Reads consecutive big chunks of one file with one vectored request, straight into
        their outputs where possible, then verifies and delivers each."""
        reader = self.opened.get(run[0].chunk.file, self.stats)
        landed = [piece.landing() for piece in run]
        landings = [
            view if view is not None else memoryview(bytearray(piece.chunk.nbytes))
            for piece, view in zip(run, landed)
        ]
        expected = sum(piece.chunk.nbytes for piece in run)
        if reader.readv_into(run[0].chunk.offset, landings) != expected:
            raise CorruptCheckpointError(
                f"data file {self.files[run[0].chunk.file].name} ends inside a chunk",
                path=self.where,
                leaf=run[0].leaf,
            )
        for piece, landing, view in zip(run, landings, landed):
            _verify(landing, piece, self.files, self.where)
            piece.deliver(landing, view)
        return expected

    def group(self, group: list[_Piece]) -> int:
        """Reads adjacent small chunks of one file with one request."""
        first, last = group[0].chunk, group[-1].chunk
        span = last.offset + last.nbytes - first.offset
        buffer = memoryview(bytearray(span))
        reader = self.opened.get(first.file, self.stats)
        if reader.read_into(first.offset, buffer) != span:
            raise CorruptCheckpointError(
                f"data file {self.files[first.file].name} ends inside a chunk", path=self.where
            )
        for piece in group:
            begin = piece.chunk.offset - first.offset
            view = buffer[begin : begin + piece.chunk.nbytes]
            _verify(view, piece, self.files, self.where)
            piece.deliver(view)
        return span


def _read_steps(
    pieces: Sequence[_Piece], reading: _Reading
) -> list[tuple[int, int, Callable[[Any], int], Any]]:
    """Cuts the pieces into read steps: runs of adjacent small chunks, and runs of
    consecutive big ones (each as (file, offset, function, argument))."""
    steps: list[tuple[int, int, Callable[[Any], int], Any]] = []
    small = sorted(
        (p for p in pieces if p.chunk.nbytes < _SMALL), key=lambda p: (p.chunk.file, p.chunk.offset)
    )
    group: list[_Piece] = []
    for piece in small:
        if group:
            prev = group[-1].chunk
            gap = piece.chunk.offset - (prev.offset + prev.nbytes)
            span = piece.chunk.offset + piece.chunk.nbytes - group[0].chunk.offset
            if piece.chunk.file != prev.file or not 0 <= gap <= _SMALL or span > _BATCH_BYTES:
                steps.append((group[0].chunk.file, group[0].chunk.offset, reading.group, group))
                group = []
        group.append(piece)
    if group:
        steps.append((group[0].chunk.file, group[0].chunk.offset, reading.group, group))
    run: list[_Piece] = []
    big = sorted(
        (p for p in pieces if p.chunk.nbytes >= _SMALL),
        key=lambda p: (p.chunk.file, p.chunk.offset),
    )
    for piece in big:
        if run:
            prev = run[-1].chunk
            size = sum(p.chunk.nbytes for p in run)
            if (
                piece.chunk.file != prev.file
                or piece.chunk.offset != prev.offset + prev.nbytes
                or size + piece.chunk.nbytes > _RUN_BYTES
                or len(run) >= 512
                # Chunks needing a bounce buffer (resharding) are read alone: bounded memory.
                or piece.landing() is None
                or run[-1].landing() is None
            ):
                steps.append((run[0].chunk.file, run[0].chunk.offset, reading.run, run))
                run = []
        run.append(piece)
    if run:
        steps.append((run[0].chunk.file, run[0].chunk.offset, reading.run, run))
    return steps


def check_sizes(
    storage: Storage, directory: str, files: Sequence[DataFile], indices: Any, where: str
) -> None:
    """Checks that the given data files exist with the sizes the manifest records.

    Called before any output is allocated, so that a manifest declaring more bytes than the
    files hold cannot cause a large allocation.

    Raises:
      CorruptCheckpointError: a file is missing or has another size.
    """
    opened = _Files(storage, directory, files, where)
    try:
        for index in sorted(indices):
            opened.get(index, RestoreStats())
    finally:
        opened.close()


def verify_chunks(
    storage: Storage,
    directory: str,
    files: Sequence[DataFile],
    pieces: Sequence[tuple[str, Chunk]],
    *,
    where: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Re-reads chunks and checks their checksums; returns one message per problem.

    Args:
      pieces: (leaf path, chunk) pairs.
      progress: Called with (bytes checked, total bytes) after each chunk.
    """
    problems: list[str] = []
    bad_files: set[int] = set()
    for index in sorted({c.file for _, c in pieces}):
        try:
            check_sizes(storage, directory, files, [index], where)
        except CorruptCheckpointError as e:
            problems.append(str(e))
            bad_files.add(index)
    opened = _Files(storage, directory, files, where)
    total = sum(c.nbytes for _, c in pieces)
    done = 0
    buffer = memoryview(bytearray(_BATCH_BYTES))
    try:
        for leaf, chunk in sorted(pieces, key=lambda p: (p[1].file, p[1].offset)):
            if chunk.file not in bad_files:
                # Checked in bounded blocks: a huge chunk never needs a huge buffer.
                reader = opened.get(chunk.file, RestoreStats())
                actual, position, end = 0, chunk.offset, chunk.offset + chunk.nbytes
                while position < end:
                    view = buffer[: min(len(buffer), end - position)]
                    n = reader.read_into(position, view)
                    actual = checksum(view[:n], actual)
                    position += n
                    if n < len(view):
                        break
                if position != end or actual != chunk.crc32c:
                    problems.append(
                        f"{leaf}: checksum mismatch in {files[chunk.file].name} at bytes "
                        f"{chunk.offset}..{end} (chunk starting at {list(chunk.start)}): stored "
                        f"{chunk.crc32c:#010x}, read {actual:#010x}"
                    )
            done += chunk.nbytes
            if progress is not None:
                progress(done, total)
    finally:
        opened.close()
    return problems


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
        entry = _entries([(name, dtype, c.shape, c.stored)])[name]
        entry["data_offsets"] = [begin, begin + c.stored]
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
