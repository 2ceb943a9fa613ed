"""Data files -> array bytes: ranged, verified, parallel reads.

Reading fills the caller's output arrays directly when a chunk is a contiguous slab of them,
coalesces small neighbouring chunks into one read (while the gaps stay small), reads only the
blocks of a chunk a target needs where the chunk has block checksums, decodes compressed
chunks straight into place, and verifies every checksum before the bytes are used.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keepax._src.format import blocks, codecs, spec
from keepax._src.format.boxes import Box, intersect, local_slices
from keepax._src.format.datafiles import bytes_view, checksum
from keepax._src.format.manifest import Chunk, DataFile
from keepax._src.io.base import Reader, Storage
from keepax.errors import CorruptCheckpointError

__all__ = ["ReadRequest", "RestoreStats", "check_sizes", "read_requests", "verify_chunks"]

_SMALL = 256 << 10  # chunks below this are coalesced with their neighbours
_BATCH_BYTES = 16 << 20  # at most this much read by one coalesced read
_IOVECS = 256  # buffers per vectored read of small chunks
_RUN_BYTES = 256 << 20  # consecutive big chunks read with one vectored request, up to this
_WASTE = blocks.WASTE


@dataclasses.dataclass
class ReadRequest:
    """Fill ``out`` (a C-contiguous array holding box ``box`` of a leaf) from that leaf's
    chunks.

    Attributes:
      leaf: The leaf's key path, for error messages.
      chunks: The leaf's chunks (all of them; only those overlapping ``box`` are read).
      box: The box of the global array that ``out`` holds.
      out: Destination array, C-contiguous, of the leaf's stored dtype and ``box``'s shape.
      view: ``out``'s bytes, if the caller has them at hand (else made when needed).
    """

    leaf: str
    chunks: Sequence[Chunk]
    box: Box
    out: np.ndarray
    view: memoryview | None = None


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


@dataclasses.dataclass(slots=True)
class _Piece:
    """One chunk to read (once), and every place its bytes go."""

    chunk: Chunk
    leaf: str
    targets: list[tuple[ReadRequest, memoryview | None]]  # (request, direct slab or None)
    ranges: list[tuple[int, int]] | None = None  # the byte ranges to read; None: all

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
        return bytes_view(out)
    if tuple(chunk.shape[1:]) != tuple(shape[1:]) or tuple(chunk.start[1:]) != tuple(start[1:]):
        return None
    if chunk.start[0] < start[0] or chunk.start[0] + chunk.shape[0] > start[0] + shape[0]:
        return None
    row = math.prod(shape[1:]) * out.dtype.itemsize
    begin = (chunk.start[0] - start[0]) * row
    return bytes_view(out)[begin : begin + chunk.nbytes]


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
                    reader = self._storage.open(spec.data_path(self._directory, entry.name))
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


def _verify(
    view: memoryview, piece: _Piece, files: Sequence[DataFile], where: str,
    block: int | None = None,
) -> None:
    """Checks a chunk's CRC-32C, or (``block``) the CRC-32C of that block of it."""
    actual = checksum(view)
    chunk = piece.chunk
    stored = chunk.crc32c if block is None else chunk.crc32c_blocks[block]
    if actual != stored:
        begin = chunk.offset + (0 if block is None else block * chunk.crc32c_block)
        what = "" if block is None else f"block {block} of the "
        raise CorruptCheckpointError(
            f"checksum mismatch in {files[chunk.file].name} at bytes "
            f"{begin}..{begin + len(view)} ({what}chunk starting at {list(chunk.start)}"
            f", shape {list(chunk.shape)}): stored {stored:#010x}, read {actual:#010x}; "
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
        chunks = request.chunks
        if len(chunks) == 1:
            chunk = chunks[0]
            box = request.box
            if chunk.shape == box[1] and chunk.start == box[0] and chunk.nbytes:
                # The common request: one chunk holding exactly the box, read straight into it.
                key = (chunk.file, chunk.offset)
                piece = by_chunk.get(key)
                if piece is None:
                    piece = by_chunk[key] = _Piece(chunk, request.leaf, [])
                view = request.view
                piece.targets.append((request, bytes_view(request.out) if view is None else view))
                continue
        for chunk in request.chunks:
            if chunk.nbytes == 0 or intersect((chunk.start, chunk.shape), request.box) is None:
                continue
            piece = by_chunk.setdefault(
                (chunk.file, chunk.offset), _Piece(chunk, request.leaf, [])
            )
            piece.targets.append((request, _direct_view(request, chunk)))
    pieces = list(by_chunk.values())
    for piece in pieces:
        if piece.targets[0][1] is None and all(view is None for _, view in piece.targets):
            piece.ranges = blocks.needed_ranges(piece.chunk, [r.box for r, _ in piece.targets])
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

    def partial(self, piece: _Piece) -> int:
        """Reads the block ranges of a chunk its targets need (each block verified), and
        delivers them (the rest of the bounce buffer is never copied out)."""
        chunk = piece.chunk
        reader = self.opened.get(chunk.file, self.stats)
        buffer = memoryview(bytearray(chunk.nbytes))
        assert piece.ranges is not None
        for begin, end in piece.ranges:
            if reader.read_into(chunk.offset + begin, buffer[begin:end]) != end - begin:
                raise CorruptCheckpointError(
                    f"data file {self.files[chunk.file].name} ends inside a chunk",
                    path=self.where, leaf=piece.leaf,
                )
            size = chunk.crc32c_block
            for b in range(begin, end, size):
                _verify(buffer[b : min(b + size, end)], piece, self.files, self.where, b // size)
        piece.deliver(buffer)
        return sum(end - begin for begin, end in piece.ranges)

    def decode(self, piece: _Piece) -> int:
        """Reads an encoded chunk's stored bytes, verifies them, and decodes them straight
        into its output slab (or one buffer of its logical size, to scatter from)."""
        chunk = piece.chunk
        # NumPy buffers: not zeroed, and backed by huge pages when big (a bytearray's zeroing
        # and 4 KiB page faults cost as much as the decoding).
        stored = np.empty(chunk.stored, np.uint8).data
        reader = self.opened.get(chunk.file, self.stats)
        if reader.read_into(chunk.offset, stored) != chunk.stored:
            raise CorruptCheckpointError(
                f"data file {self.files[chunk.file].name} ends inside a chunk", path=self.where,
                leaf=piece.leaf)
        _verify(stored, piece, self.files, self.where)
        landed = piece.landing()
        landing = landed if landed is not None else np.empty(chunk.nbytes, np.uint8).data
        codecs.decode_into(stored, chunk.codec, landing, leaf=piece.leaf, where=self.where,
                           itemsize=chunk.nbytes // max(1, math.prod(chunk.shape)))
        piece.deliver(landing, landed)
        return chunk.stored

    def group(self, group: list[_Piece]) -> int:
        """Reads adjacent small chunks of one file with one request."""
        first, last = group[0].chunk, group[-1].chunk
        span = last.offset + last.nbytes - first.offset
        reader = self.opened.get(first.file, self.stats)
        if type(reader).readv_into is not Reader.readv_into:  # vectored reads
            return self._group_direct(reader, group, span)
        buffer = memoryview(bytearray(span))
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


    def _group_direct(self, reader: Reader, group: list[_Piece], span: int) -> int:
        """:meth:`group` with the chunks read straight into their outputs (a few hundred
        per vectored request), gaps and chunks without a slab into scratch buffers."""
        landings: list[memoryview] = []
        end = group[0].chunk.offset
        for piece in group:
            chunk = piece.chunk
            if chunk.offset > end:
                landings.append(memoryview(bytearray(chunk.offset - end)))
            view = piece.targets[0][1] if len(piece.targets) == 1 else piece.landing()
            landings.append(view if view is not None else memoryview(bytearray(chunk.nbytes)))
            end = chunk.offset + chunk.nbytes
        offset = group[0].chunk.offset
        for i in range(0, len(landings), _IOVECS):
            batch = landings[i : i + _IOVECS]
            want = sum(len(view) for view in batch)
            if reader.readv_into(offset, batch) != want:
                raise CorruptCheckpointError(
                    f"data file {self.files[group[0].chunk.file].name} ends inside a chunk",
                    path=self.where,
                )
            offset += want
        filled = iter(landings)
        end = group[0].chunk.offset
        for piece in group:
            chunk = piece.chunk
            if chunk.offset > end:
                next(filled)  # a gap
            landing = next(filled)
            if checksum(landing) != chunk.crc32c:
                _verify(landing, piece, self.files, self.where)  # raises, saying where
            if len(piece.targets) > 1 or piece.targets[0][1] is not landing:
                piece.deliver(landing, landing)
            end = chunk.offset + chunk.nbytes
        return span


def _read_steps(
    pieces: Sequence[_Piece], reading: _Reading
) -> list[tuple[int, int, Callable[[Any], int], Any]]:
    """Cuts the pieces into read steps: runs of adjacent small chunks, and runs of
    consecutive big ones (each as (file, offset, function, argument))."""
    steps: list[tuple[int, int, Callable[[Any], int], Any]] = []
    small: list[tuple[int, int, _Piece]] = []  # (file, offset) is unique per piece
    pieces_left: list[_Piece] = []
    for p in pieces:
        c = p.chunk
        if c.codec != "raw" or p.ranges is not None:
            steps.append((c.file, c.offset, reading.decode if c.codec != "raw" else
                          reading.partial, p))
        elif c.nbytes < _SMALL:
            small.append((c.file, c.offset, p))
        else:
            pieces_left.append(p)
    pieces = pieces_left
    small.sort()
    group: list[_Piece] = []
    useful = waste = 0
    first = end = -1  # the group's first offset, and where its last chunk ends
    for file, offset, piece in small:
        nbytes = piece.chunk.nbytes
        if group:
            gap = offset - end
            # Gaps are read only while they cost under 1/_WASTE of the bytes wanted.
            if (file != group[-1].chunk.file or not 0 <= gap <= _SMALL
                    or offset + nbytes - first > _BATCH_BYTES
                    or (waste + gap) * _WASTE > useful + nbytes):
                steps.append((group[0].chunk.file, first, reading.group, group))
                group, useful, waste = [], 0, 0
            else:
                waste += gap
        if not group:
            first = offset
        group.append(piece)
        useful += nbytes
        end = offset + nbytes
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
    total = sum(c.stored for _, c in pieces)
    done = 0
    buffer = memoryview(bytearray(_BATCH_BYTES))
    try:
        for leaf, chunk in sorted(pieces, key=lambda p: (p[1].file, p[1].offset)):
            if chunk.file not in bad_files:
                # Checked in bounded blocks: a huge chunk never needs a huge buffer.
                reader = opened.get(chunk.file, RestoreStats())
                actual, position, end = 0, chunk.offset, chunk.offset + chunk.stored
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
            done += chunk.stored
            if progress is not None:
                progress(done, total)
    finally:
        opened.close()
    return problems
