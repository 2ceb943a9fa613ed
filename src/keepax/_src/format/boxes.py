"""Boxes (hyper-rectangles of an array), which shards a process writes, and target shards.

A *box* is ``(start, shape)``: two tuples of ints. Chunks on disk and shards in memory are
both boxes of the global array, so reading a target shard is intersecting boxes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "Box",
    "box_from_index",
    "intersect",
    "covers_exactly",
    "split_rows",
    "local_slices",
    "owned_shards",
    "target_boxes",
    "aligned_empty",
    "HostArena",
]

Box = tuple[tuple[int, ...], tuple[int, ...]]


def box_from_index(index: Sequence[slice], shape: Sequence[int]) -> Box:
    """Converts a shard's index (a tuple of slices, as JAX gives it) into a box."""
    start, size = [], []
    for axis, dim in enumerate(shape):
        sl = index[axis] if axis < len(index) else slice(None)
        lo, hi, step = sl.indices(dim)
        if step != 1:
            raise ValueError(f"strided shard index {index!r} is not supported")
        start.append(lo)
        size.append(max(0, hi - lo))
    return tuple(start), tuple(size)


def intersect(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes, or None if it is empty."""
    start, shape = [], []
    for a0, an, b0, bn in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(a0, b0), min(a0 + an, b0 + bn)
        if hi <= lo:
            return None
        start.append(lo)
        shape.append(hi - lo)
    return tuple(start), tuple(shape)


_PRIME = (1 << 61) - 1  # a Mersenne prime: the field the cover test computes in
_RANDOM = random.Random()  # seeded from os.urandom: a hostile input cannot predict it


def covers_exactly(boxes: Iterable[Box], regions: Iterable[Box]) -> bool:
    """Whether ``boxes`` cover exactly what ``regions`` cover, every point as many times.

    With disjoint ``regions`` (one: the whole array), this says the boxes are pairwise
    disjoint and cover the regions exactly. Cost O(n * rank) for n boxes, whatever their
    arrangement (a sweep is quadratic for covers crafted to keep many boxes active).

    How: the indicator of a half-open box ``[a, b)`` is a signed sum of its corners' orthants,
    and two sums of boxes are equal as functions exactly when their signed corner counts are.
    Those counts are the coefficients of the polynomial ``sum over boxes of prod_d
    (X[d, b_d] - X[d, a_d])``, one variable per axis and coordinate, so the two covers are
    equal iff their polynomials are; the polynomials are compared at a secret random point
    modulo a 61-bit prime (Schwartz-Zippel: a wrong "equal" has probability at most
    rank / 2**61 < 2**-54 per call).
    """
    boxes, regions = list(boxes), list(regions)
    if len(boxes) == 1 and boxes == regions:
        return True  # the common case: one chunk holding the whole array
    values: dict[tuple[int, int], int] = {}

    def value(axis: int, coordinate: int) -> int:
        key = (axis, coordinate)
        x = values.get(key)
        if x is None:
            x = values[key] = _RANDOM.getrandbits(61) % _PRIME
        return x

    def total(group: list[Box]) -> int:
        out = 0
        for start, shape in group:
            if 0 in shape:
                continue  # an empty box covers nothing
            term = 1
            for axis, (s, n) in enumerate(zip(start, shape)):
                term = term * (value(axis, s + n) - value(axis, s)) % _PRIME
            out = (out + term) % _PRIME
        return out

    return total(boxes) == total(regions)


def local_slices(inner: Box, outer: Box) -> tuple[slice, ...]:
    """Slices selecting box ``inner`` inside an array holding box ``outer``."""
    return tuple(slice(i0 - o0, i0 - o0 + n) for i0, o0, n in zip(inner[0], outer[0], inner[1]))


def split_rows(box: Box, itemsize: int, max_bytes: int) -> Iterator[Box]:
    """Splits a box along its first axis into boxes of at most ``max_bytes`` (at least a row)."""
    start, shape = box
    if not shape or math.prod(shape) * itemsize <= max_bytes or shape[0] <= 1:
        yield box
        return
    row_bytes = math.prod(shape[1:]) * itemsize
    rows = max(1, max_bytes // max(1, row_bytes))
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        yield (start[0] + r,) + start[1:], (n,) + shape[1:]


def owned_shards(array: jax.Array) -> list[tuple[Box, Any]]:
    """The shards of a ``jax.Array`` this process must write: one replica of each, as
    (box, shard data) pairs. Replicas with ``replica_id != 0`` are skipped, so every unique
    shard is written exactly once across all processes."""
    shape = array.shape
    if len(array.sharding.device_set) == 1:
        return [(((0,) * len(shape), tuple(shape)), array)]
    out = []
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        out.append((box_from_index(shard.index, shape), shard.data))
    return out


def target_boxes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[Box, list[Any]]:
    """The unique boxes this process must hold for ``sharding``, with the devices of each."""
    boxes: dict[Box, list[Any]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        boxes.setdefault(box_from_index(index or (), shape), []).append(device)
    return boxes


def aligned_empty(shape: Sequence[int], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is ``alignment``-byte aligned.

    JAX's CPU backend adopts aligned host buffers without copying them.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class HostArena:
    """Hands out small aligned host arrays carved from shared blocks.

    Allocating thousands of tiny arrays one by one costs more than reading them; carving them
    from 4 MiB blocks does not. Arrays of ``min_own`` bytes or more get their own buffer, so a
    large restored array never keeps others alive.
    """

    def __init__(self, block: int = 4 << 20, min_own: int = 64 << 10, alignment: int = 64):
        self._block, self._min_own, self._alignment = block, min_own, alignment
        self._left: int | None = None
        self._buffer: np.ndarray | None = None
        self._bytes = memoryview(b"")  # the block's bytes
        self._used = 0

    def _carved(self, nbytes: int) -> int:
        """The bytes :meth:`empty` carves from a block for an array of ``nbytes`` (0: its own
        buffer)."""
        if nbytes >= self._min_own or nbytes == 0:
            return 0
        return -(-nbytes // self._alignment) * self._alignment

    def reserve(self, shape: Sequence[int], dtype: np.dtype, count: int = 1) -> None:
        """Announces ``count`` arrays :meth:`empty` will be asked for. Once any is
        announced, no block is larger than what is left to carve (a small restore never
        allocates a whole block)."""
        itemsize = (dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)).itemsize
        self._left = (self._left or 0) + count * self._carved(math.prod(shape) * itemsize)

    def empty(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """An uninitialised aligned C-contiguous array."""
        return self.empty_with_bytes(shape, dtype)[0]

    def empty_with_bytes(
        self, shape: Sequence[int], dtype: np.dtype
    ) -> tuple[np.ndarray, memoryview]:
        """:meth:`empty`, with a flat byte view of the array (to read into)."""
        if not isinstance(dtype, np.dtype):
            dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        size = self._carved(nbytes)
        if not size:
            out = aligned_empty(shape, dtype, self._alignment)
            return out, memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        if self._buffer is None or self._used + nbytes > len(self._buffer):
            block = self._block if self._left is None else max(size, min(self._block, self._left))
            self._buffer = aligned_empty((block,), np.dtype(np.uint8), self._alignment)
            self._bytes = memoryview(self._buffer)  # type: ignore[arg-type]
            self._used = 0
        used = self._used
        out = np.ndarray(tuple(shape), dtype, self._buffer, used)  # one call: a view
        self._used += size
        if self._left is not None:
            self._left -= size
        return out, self._bytes[used : used + nbytes]
