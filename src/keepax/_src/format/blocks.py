"""Block checksums inside large chunks (format 1.2 ``crc32c_block``/``crc32c_blocks``,
``docs/FORMAT.md`` §5.4): how big the blocks are, computing them while a chunk streams out, and
which blocks a reader whose boxes cut a chunk must read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import crc32c as _crc32c
import numpy as np

from keepax._src.format.boxes import Box, intersect
from keepax._src.format.manifest import Chunk

__all__ = ["WASTE", "BlockCrcs", "crc32c_block_size", "needed_ranges"]

_MIN_BLOCK = 4 << 10
_MAX_BLOCK = 1 << 20
WASTE = 16
"""Reads skip what their boxes do not need unless reading it costs under 1/WASTE more."""


def checksum(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def crc32c_block_size(shape: Sequence[int], itemsize: int) -> int:
    """The block size of a chunk's block checksums (docs/FORMAT.md §5.4), or 0 for none.

    About a sixteenth of a row (the bytes of one index of the first axis), within
    [4 KiB, 1 MiB] and a power of two: a reader whose box cuts the chunk along its first axis
    reads at most a block more than it needs at each cut, and one that cuts its rows into a
    few pieces reads about a sixteenth more. Chunks under four blocks have none.
    """
    nbytes = math.prod(shape) * itemsize
    row = math.prod(shape[1:]) * itemsize if len(shape) > 1 else itemsize
    block = 1 << max(0, (row // 16).bit_length() - 1)
    block = min(max(block, _MIN_BLOCK), _MAX_BLOCK)
    return block if nbytes >= 4 * block else 0


class BlockCrcs:
    """CRC-32C of each consecutive ``size`` bytes of a stream fed in pieces of any length."""

    def __init__(self, size: int) -> None:
        self.size, self._crc, self._filled = size, 0, 0
        self.crcs: list[int] = []

    def feed(self, view: memoryview) -> None:
        """Checksums the next bytes of the stream."""
        position = 0
        while position < len(view):
            take = min(self.size - self._filled, len(view) - position)
            self._crc = checksum(view[position : position + take], self._crc)
            self._filled += take
            position += take
            if self._filled == self.size:
                self.crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> tuple[int, ...]:
        """The checksums of every block (the last one possibly short)."""
        if self._filled:
            self.crcs.append(self._crc)
            self._crc, self._filled = 0, 0
        return tuple(self.crcs)


def _runs(chunk: Chunk, overlap: Box) -> tuple[np.ndarray, int]:
    """The byte offsets (in the chunk) of the contiguous runs holding ``overlap``, and their
    common length."""
    shape, itemsize = chunk.shape, chunk.nbytes // max(1, math.prod(chunk.shape))
    local = [s - c for s, c in zip(overlap[0], chunk.start)]
    strides = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    if not shape:
        return np.zeros(1, np.int64), chunk.nbytes
    k = len(shape) - 1  # the runs are contiguous from axis k on
    while k > 0 and overlap[1][k] == shape[k]:
        k -= 1
    offsets = np.array(local[k] * strides[k], np.int64)
    for d in range(k - 1, -1, -1):
        axis = (local[d] + np.arange(overlap[1][d], dtype=np.int64)) * strides[d]
        offsets = np.add.outer(axis, offsets)
    return offsets.reshape(-1), overlap[1][k] * strides[k]


def needed_ranges(chunk: Chunk, boxes: Iterable[Box]) -> list[tuple[int, int]] | None:
    """The block-aligned byte ranges of a chunk with block checksums that the given boxes
    need, or None when they need (about) all of it or it has none."""
    size = chunk.crc32c_block
    if not size:
        return None
    count = len(chunk.crc32c_blocks)
    marks = np.zeros(count + 1, np.int64)
    for box in boxes:
        overlap = intersect((chunk.start, chunk.shape), box)
        if overlap is None:
            continue
        offsets, length = _runs(chunk, overlap)
        np.add.at(marks, offsets // size, 1)
        np.add.at(marks, (offsets + length - 1) // size + 1, -1)
    needed = np.cumsum(marks[:-1]) > 0
    if int(needed.sum()) * WASTE >= count * (WASTE - 1):
        return None
    edges = np.flatnonzero(np.diff(np.concatenate(([0], needed.astype(np.int8), [0]))))
    return [(int(b) * size, min(int(e) * size, chunk.nbytes))
            for b, e in zip(edges[::2], edges[1::2])]
