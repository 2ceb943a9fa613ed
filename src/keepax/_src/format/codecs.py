"""Chunk codecs (format 1.2 ``codec``): ``raw``, ``zstd`` and (format 1.3) ``zstd-shuffle``.

A ``zstd`` chunk's stored bytes are one Zstandard frame (RFC 8878) whose content is the chunk's
C-order bytes; a ``zstd-shuffle`` chunk's frame holds them *byte-shuffled*: each block of
:data:`SHUFFLE_ELEMENTS` elements with the first byte of every element first, then every
second byte, and so on (docs/FORMAT.md §5.4.2), which groups the sign/exponent bytes of floats
(and the high bytes of small integers) so that Zstandard finds them. Writers compress each
chunk on its own (so chunks compress in parallel and a restore reads only the chunks it
needs), choose between the two codecs per chunk by compressing a small sample both ways, and
keep a chunk ``raw`` when compression does not make it smaller. Readers decompress straight
into the output array (a shuffled chunk through one block of scratch) and never produce more
than the chunk's logical size: a frame that holds more or fewer bytes is damage.

The ``zstandard`` package (the ``zstd`` extra) is imported only when a save compresses or a
restore meets a compressed chunk.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = ["Compression", "SHUFFLE_ELEMENTS", "parse_compression", "compress", "decode_into",
           "shuffle_into", "unshuffle_into", "zstandard"]

_LEVELS = range(-7, 23)
"""Zstandard levels accepted: negative (fastest) to 22 (smallest)."""
DEFAULT_LEVEL = 1
"""Level 1: ~650 MB/s per core on float weights, 2-4x level 3's speed for ratios within
0.2 % of it on float, bf16 and zero-heavy states (BENCHMARKS.md); Orbax's ratios too."""
SHUFFLE_ELEMENTS = 1 << 17
"""``zstd-shuffle`` shuffles each consecutive 2**17 elements of a chunk on their own (the last
block may be shorter): a format constant (docs/FORMAT.md §5.4.2) that keeps the scratch of
writers and readers small (128 KiB per byte of an element) while each byte plane fills a
Zstandard block (128 KiB), so each gets its own entropy tables."""
_SAMPLE = 64 << 10
"""Bytes per sample piece: a chunk's codec is chosen by compressing a few such pieces."""
_SAMPLES = 4
_SHUFFLE_PAYS = 0.97
"""Shuffle when the shuffled sample compresses to under this fraction of the plain one."""
_WORTH = 0.99
"""Store a chunk raw, without compressing it whole, when its best sample compresses to at
least this fraction of its size."""
INSTALL_HINT = "install it with `pip install 'keepax[zstd]'` (or `pip install zstandard`)"


@dataclasses.dataclass(frozen=True)
class Compression:
    """How a save compresses its chunks.

    Attributes:
      codec: The chunk codec (``zstd``).
      level: The codec's level.
    """

    codec: str
    level: int


def zstandard() -> Any:
    """The ``zstandard`` module.

    Raises:
      KeepaxError: It is not installed (saying how to install it).
    """
    try:
        import zstandard as zstd  # noqa: PLC0415 - optional dependency, imported when needed
    except ImportError as e:
        raise KeepaxError(f"zstd compression needs the 'zstandard' package: {INSTALL_HINT}") from e
    return zstd


def parse_compression(value: Any) -> Compression | None:
    """Checks a ``compression=`` argument: None (no compression), ``"zstd"`` (level 1) or
    ``("zstd", level)`` with ``-7 <= level <= 22``.

    Raises:
      KeepaxError: Another value, or ``zstandard`` is not installed.
    """
    if value is None:
        return None
    codec, level = value, DEFAULT_LEVEL
    if isinstance(value, tuple) and len(value) == 2:
        codec, level = value
    if codec != "zstd" or isinstance(level, bool) or not isinstance(level, int) or (
        level not in _LEVELS
    ):
        raise KeepaxError(f"compression must be None, 'zstd' or ('zstd', level) with level an "
                          f"integer from -7 to 22, not {value!r:.80}")
    zstandard()
    return Compression("zstd", level)


_local = threading.local()


def _compressor(level: int, threads: int) -> Any:
    """This thread's compressor (zstandard compressors are not thread-safe)."""
    cache: dict[tuple[int, int], Any] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if (level, threads) not in cache:
        cache[level, threads] = zstandard().ZstdCompressor(
            level=level, write_content_size=True, threads=threads)
    return cache[level, threads]


def shuffle_into(source: np.ndarray, out: np.ndarray, itemsize: int) -> None:
    """Writes one block's bytes shuffled: byte ``k`` of element ``i`` goes to
    ``out[k * n + i]`` (``n`` elements of ``itemsize`` bytes; both arrays 1-d ``uint8``)."""
    n = len(source) // itemsize
    for k in range(itemsize):
        out[k * n : (k + 1) * n] = source[k::itemsize]


def unshuffle_into(source: np.ndarray, out: np.ndarray, itemsize: int) -> None:
    """The inverse of :func:`shuffle_into`: a strided copy of each byte plane into place."""
    n = len(source) // itemsize
    for k in range(itemsize):
        out[k::itemsize] = source[k * n : (k + 1) * n]


def _shuffled(data: np.ndarray, itemsize: int, compressor: Any) -> bytes:
    """One frame of ``data`` byte-shuffled block by block, streamed through one block of
    scratch (the compressor copies what it is given before returning)."""
    stream = compressor.compressobj(size=len(data))
    block_bytes = SHUFFLE_ELEMENTS * itemsize
    scratch = np.empty(min(block_bytes, len(data)), np.uint8)
    parts = []
    for begin in range(0, len(data), block_bytes):
        block = data[begin : begin + block_bytes]
        shuffle_into(block, scratch, itemsize)
        parts.append(stream.compress(scratch[: len(block)]))
    parts.append(stream.flush())
    return b"".join(parts)


def _sample(data: np.ndarray, itemsize: int, level: int) -> tuple[int, int, int]:
    """(sample bytes, their plain frames' size, their shuffled frames' size): up to
    ``_SAMPLES`` pieces of ``_SAMPLE`` bytes spread over a chunk bigger than two pieces. A
    piece's shuffled size is the sum of its byte planes compressed apart (as a whole block's
    planes are, each filling its own Zstandard blocks)."""
    count = min(_SAMPLES, max(1, len(data) // (16 * _SAMPLE)))
    step = (len(data) - _SAMPLE) // max(1, count - 1) // itemsize * itemsize
    compressor = _compressor(level, 0)
    plain = shuffled = 0
    for i in range(count):
        piece = data[i * step : i * step + _SAMPLE]
        size = len(compressor.compress(piece))
        plain += size
        shuffled += sum(len(compressor.compress(np.ascontiguousarray(piece[k::itemsize])))
                        for k in range(itemsize)) if itemsize > 1 else size
    return count * _SAMPLE, plain, shuffled


def compress(data: memoryview, compression: Compression, threads: int = 0,
             itemsize: int = 1) -> tuple[bytes, str] | None:
    """A chunk's stored bytes and codec under ``compression``, or None when compressing does
    not make it smaller (the chunk is then stored ``raw``). Releases the GIL while compressing.

    A chunk of more than two sample pieces is sampled (a few 64 KiB pieces compressed plain
    and shuffled): shuffled if that pays, raw if neither compresses, then compressed whole; a
    smaller one is compressed whole both ways (for ``itemsize > 1``) and the smaller kept.

    Args:
      data: The chunk's C-order bytes.
      threads: Zstandard worker threads for this one chunk (0: the calling thread only); the
        output is one frame either way.
      itemsize: The bytes of one element (shuffling groups them by position; 1: no shuffle).
    """
    source = np.frombuffer(data, np.uint8)
    level, one = compression.level, _compressor(compression.level, 0)
    if len(source) <= 2 * _SAMPLE:
        candidates = [(one.compress(source), "zstd")]
        if itemsize > 1:
            candidates.append((_shuffled(source, itemsize, one), "zstd-shuffle"))
        out, codec = min(candidates, key=lambda c: len(c[0]))
        return (out, codec) if len(out) < len(data) else None
    size, plain, shuffled = _sample(source, itemsize, level)
    if min(plain, shuffled) >= size * _WORTH:
        return None
    compressor = _compressor(level, threads if threads > 1 else 0)
    if shuffled < plain * _SHUFFLE_PAYS:
        out, codec = _shuffled(source, itemsize, compressor), "zstd-shuffle"
    else:
        out, codec = compressor.compress(source), "zstd"
    return (out, codec) if len(out) < len(data) else None


def _fill(reader: Any, out: memoryview) -> int:
    """Reads from a decompressing stream until ``out`` is full or the frame ends."""
    filled = 0
    while filled < len(out):
        n = reader.readinto(out[filled:])
        if n == 0:
            break
        filled += n
    return filled


def _unshuffling(reader: Any, out: memoryview, itemsize: int) -> int:
    """Decompresses a shuffled frame block by block into scratch, unshuffling each block
    into ``out``; returns the bytes produced (at most ``len(out)``)."""
    target = np.frombuffer(out, np.uint8)
    block_bytes = SHUFFLE_ELEMENTS * itemsize
    scratch = np.empty(min(block_bytes, len(out)), np.uint8)
    view = memoryview(scratch.data)
    for begin in range(0, len(out), block_bytes):
        size = min(block_bytes, len(out) - begin)
        filled = _fill(reader, view[:size])
        if filled < size:
            return begin + filled
        unshuffle_into(scratch[:size], target[begin : begin + size], itemsize)
    return len(out)


def decode_into(stored: memoryview, codec: str, out: memoryview, *, leaf: str,
                where: str, itemsize: int = 1) -> None:
    """Decodes a chunk's (checksum-verified) stored bytes into ``out``, exactly its logical
    size, never producing more.

    Args:
      itemsize: The bytes of one element of the chunk's dtype (``zstd-shuffle`` needs it).

    Raises:
      CorruptCheckpointError: An unknown codec, a malformed frame, or one that holds more or
        fewer bytes than ``len(out)`` (naming the leaf).
      KeepaxError: ``zstandard`` is not installed.
    """
    if codec not in ("zstd", "zstd-shuffle"):  # parse_chunk_extras admits no other
        raise CorruptCheckpointError(f"unknown codec {codec!r:.40}", path=where, leaf=leaf)
    shuffled = codec == "zstd-shuffle" and itemsize > 1
    if shuffled and len(out) % itemsize:
        raise CorruptCheckpointError(f"a {codec} chunk of {len(out)} bytes is not a whole "
                                     f"number of {itemsize}-byte elements", path=where, leaf=leaf)
    zstd = zstandard()
    filled, extra = 0, b""
    try:
        with zstd.ZstdDecompressor().stream_reader(stored, read_across_frames=False) as reader:
            filled = _unshuffling(reader, out, itemsize) if shuffled else _fill(reader, out)
            if filled == len(out):
                extra = reader.read(1)  # a frame that goes on is a decompression bomb
    except zstd.ZstdError as e:
        raise CorruptCheckpointError(
            f"a {codec} chunk of {len(stored)} stored bytes does not decompress ({e}); the "
            "data file is damaged: restore an earlier checkpoint", path=where, leaf=leaf) from e
    if filled != len(out) or extra:
        size = f"more than {len(out)}" if extra else str(filled)
        raise CorruptCheckpointError(
            f"a {codec} chunk decompresses to {size} bytes, its logical size is {len(out)}; "
            "the checkpoint is damaged or hostile: restore an earlier checkpoint",
            path=where, leaf=leaf)
