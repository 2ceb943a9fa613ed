"""Content digests of chunks (format 1.2 ``digest``): what incremental saves compare.

Checksums (CRC-32C) keep doing integrity; digests do identity. keepax uses XXH3-128 (the
``xxhash`` package): a 128-bit non-cryptographic hash at ~20 GB/s per core, so hashing the
unchanged bytes of a state costs far less than writing them. Collisions between the chunks of
one manager directory are not a practical concern at 128 bits (birthday bound ~2^64 chunks);
a digest is always compared together with the chunk's size and dtype.
"""

from __future__ import annotations

import numpy as np
import xxhash

__all__ = ["ALGORITHM", "Streaming", "digest", "sample"]

ALGORITHM = "xxh3-128"

_BLOCK = 8 << 20
"""Non-contiguous arrays are copied out and hashed in row blocks of about this size."""
_SPOTS, _SPOT = 16, 256
"""A sample is this many runs of this many bytes, spread evenly over an array's bytes."""


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def digest(array: np.ndarray) -> str:
    """``xxh3-128:<32 hex digits>`` of an array's bytes in C order (any memory layout: a
    non-contiguous array is hashed in bounded row blocks, never copied whole)."""
    if array.flags.c_contiguous:
        return f"{ALGORITHM}:{xxhash.xxh3_128_hexdigest(_bytes(array))}"
    state = xxhash.xxh3_128()
    rows = max(1, _BLOCK // max(1, array[:1].nbytes))
    for r in range(0, array.shape[0], rows):
        state.update(_bytes(np.ascontiguousarray(array[r : r + rows])))
    return f"{ALGORITHM}:{state.hexdigest()}"


class Streaming:
    """The digest of bytes fed in order, block by block: :meth:`value` equals :func:`digest`
    of the whole array they make (XXH3's streaming and one-shot forms agree)."""

    def __init__(self) -> None:
        self._state = xxhash.xxh3_128()

    def update(self, data: memoryview) -> None:
        """Feeds the next bytes."""
        self._state.update(data)

    def value(self) -> str:
        """``xxh3-128:<32 hex digits>`` of every byte fed so far."""
        return f"{ALGORITHM}:{self._state.hexdigest()}"


def sample(array: np.ndarray) -> int | None:
    """A cheap fingerprint of a C-contiguous array: XXH3-64 of ``_SPOTS`` runs of ``_SPOT``
    bytes spread evenly over its bytes (a few KiB read, whatever its size); None for a
    non-contiguous array. Two arrays with different samples differ; equal samples prove
    nothing (a hint only: :func:`digest` decides)."""
    if not array.flags.c_contiguous:
        return None
    view = _bytes(array)
    step = max(_SPOT, len(view) // _SPOTS)
    state = xxhash.xxh3_64()
    for at in range(0, len(view), step):
        state.update(view[at : at + _SPOT])
    return int(state.intdigest())
