"""Chunk codecs (format 1.2 ``codec``): ``raw``, ``zstd`` and (format 1.3) ``zstd-shuffle``.

A ``zstd`` chunk's stored bytes are one Zstandard frame (RFC 8878) whose content is the chunk's
C-order bytes. A ``zstd-shuffle`` chunk is *byte-shuffled* (docs/FORMAT.md §5.4.2): each block
of :data:`SHUFFLE_ELEMENTS` elements is cut into byte planes (byte ``k`` of every element of
the block), which groups the sign/exponent bytes of floats (and the high bytes of small
integers) so that Zstandard finds them; each plane is stored as a frame of its own, or as it
is when a frame would not be smaller (the random low mantissa bytes of floats), after a table
of the planes' stored sizes. Planes are compressed with parameters that keep Zstandard to
cheap matches and Huffman-coded literals, which is both faster and smaller on exponent planes
than level 1's own. Blocks are independent, so a big chunk's blocks are compressed by several
threads.

Writers compress each chunk on its own (so chunks compress in parallel and a restore reads
only the chunks it needs), choose between the two codecs per chunk by compressing a small
sample both ways, and keep a chunk ``raw`` when compression does not make it smaller. Readers
decode straight into the output array (a shuffled plane through at most one plane of scratch)
and never produce more than the chunk's logical size: a frame that holds more or fewer bytes
is damage.

The ``zstandard`` package (the ``zstd`` extra) is imported only when a save compresses or a
restore meets a compressed chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from typing import Any

import numpy as np

from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = ["Compression", "SHUFFLE_ELEMENTS", "parse_compression", "compress", "decode_into",
           "zstandard"]

_LEVELS = range(-7, 23)
"""Zstandard levels accepted: negative (fastest) to 22 (smallest)."""
DEFAULT_LEVEL = 1
"""Level 1: ~650 MB/s per core on float weights, 2-4x level 3's speed for ratios within
0.2 % of it on float, bf16 and zero-heavy states (BENCHMARKS.md); Orbax's ratios too."""
SHUFFLE_ELEMENTS = 1 << 17
"""``zstd-shuffle`` shuffles each consecutive 2**17 elements of a chunk on their own (the last
block may be shorter): a format constant (docs/FORMAT.md §5.4.2) that keeps the scratch of
writers and readers small (one plane, 128 KiB, per thread) while each byte plane fills a
Zstandard block (128 KiB), so each gets its own entropy tables."""
_TABLE_ENTRY = 4
"""Bytes of one plane's stored size in a ``zstd-shuffle`` chunk's table (little-endian)."""
_PLANE_MIN_MATCH, _PLANE_HASH_LOG = 7, 6
"""Plane frames at levels <= 1: Zstandard's fast strategy with its longest minimum match and
smallest hash table, so that it takes only cheap matches and codes the rest as Huffman
literals. On exponent planes of float weights and Adam moments this is 2-4x faster than level
1 and 10-15 % smaller (near the planes' byte entropy); negative levels, which turn literal
compression off, are larger (BENCHMARKS.md)."""
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
_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the parent's pool threads do not exist there; start afresh."""
    global _pools_lock  # noqa: PLW0603 - replaced, as the parent's may be held at the fork
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _compressor(level: int, threads: int = 0, planes: bool = False) -> Any:
    """This thread's compressor (zstandard compressors are not thread-safe); ``planes``: the
    one for byte planes (see ``_PLANE_MIN_MATCH``)."""
    cache: dict[tuple[int, int, bool], Any] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    key = (level, threads, planes)
    if key not in cache:
        zstd = zstandard()
        if planes and level <= 1:
            params = zstd.ZstdCompressionParameters.from_level(
                1, min_match=_PLANE_MIN_MATCH, hash_log=_PLANE_HASH_LOG, write_content_size=True)
            cache[key] = zstd.ZstdCompressor(compression_params=params)
        else:
            cache[key] = zstd.ZstdCompressor(level=level, write_content_size=True,
                                             threads=threads)
    return cache[key]


def _scratch(size: int) -> np.ndarray:
    """This thread's scratch of at least ``size`` bytes (one block, reused)."""
    scratch: np.ndarray | None = getattr(_local, "scratch", None)
    if scratch is None or len(scratch) < size:
        scratch = _local.scratch = np.empty(size, np.uint8)
    return scratch[:size]


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """A shared pool of ``threads`` workers for the blocks of big shuffled chunks (its tasks
    submit nothing, so chunks compressed on another pool may wait on it)."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="keepax-shuffle")
        return _pools[threads]


def _block_planes(block: np.ndarray, out: np.ndarray, itemsize: int, level: int) -> list[int]:
    """Stores one block's planes at the start of ``out`` (its slot, as big as the block): each
    is shuffled straight there, compressed, and its frame written over it when smaller (else
    it stays raw). Returns the planes' stored sizes."""
    n = len(block) // itemsize
    compressor = _compressor(level, planes=True)
    sizes, position = [], 0
    for k in range(itemsize):
        plane = out[position : position + n]
        plane[...] = block[k::itemsize]
        frame = compressor.compress(plane)
        size = len(frame) if len(frame) < n else n
        if size < n:
            out[position : position + size] = np.frombuffer(frame, np.uint8)
        sizes.append(size)
        position += size
    return sizes


def _shuffled(data: np.ndarray, itemsize: int, level: int, threads: int = 0
              ) -> list[memoryview]:
    """A ``zstd-shuffle`` chunk's stored bytes, in pieces: the table of its planes' stored
    sizes, then each block's planes; the blocks on ``threads`` threads when more than one.

    Each block is stored in its own slot of one output buffer of the chunk's size (one
    allocation, which NumPy backs with huge pages: a page fault per 4 KiB of many small
    buffers costs as much as the shuffle), so the pieces hold at most the logical bytes."""
    block_bytes = SHUFFLE_ELEMENTS * itemsize
    starts = range(0, len(data), block_bytes)
    out = np.empty(len(data), np.uint8)

    def encode(begin: int) -> list[int]:
        end = begin + block_bytes
        return _block_planes(data[begin:end], out[begin:end], itemsize, level)

    if threads > 1 and len(starts) > 1:
        blocks = list(_pool(threads).map(encode, starts))
    else:
        blocks = [encode(begin) for begin in starts]
    table = np.array([size for sizes in blocks for size in sizes], "<u4")
    view = out.data
    return [table.data.cast("B"),
            *(view[begin : begin + sum(sizes)] for begin, sizes in zip(starts, blocks))]


def _sample(data: np.ndarray, itemsize: int, level: int) -> tuple[int, int, int]:
    """(sample bytes, their plain frames' size, their shuffled size): up to ``_SAMPLES``
    pieces of ``_SAMPLE`` bytes spread over a chunk bigger than two pieces. A piece's shuffled
    size is the sum of its byte planes stored as a block's are (a frame each, or raw)."""
    count = min(_SAMPLES, max(1, len(data) // (16 * _SAMPLE)))
    step = (len(data) - _SAMPLE) // max(1, count - 1) // itemsize * itemsize
    compressor, planes = _compressor(level), _compressor(level, planes=True)
    plain = shuffled = 0
    for i in range(count):
        piece = data[i * step : i * step + _SAMPLE]
        size = len(compressor.compress(piece))
        plain += size
        shuffled += sum(
            min(len(planes.compress(np.ascontiguousarray(piece[k::itemsize]))),
                _SAMPLE // itemsize) + _TABLE_ENTRY for k in range(itemsize)
        ) if itemsize > 1 else size
    return count * _SAMPLE, plain, shuffled


def compress(data: memoryview, compression: Compression, threads: int = 0,
             itemsize: int = 1) -> tuple[list[memoryview], str] | None:
    """A chunk's stored bytes (in pieces, to be written in order) and codec under
    ``compression``, or None when compressing does not make it smaller (the chunk is then
    stored ``raw``). Releases the GIL while compressing.

    A chunk of more than two sample pieces is sampled (a few 64 KiB pieces compressed plain
    and shuffled): shuffled if that pays, raw if neither compresses, then compressed whole; a
    smaller one is compressed whole both ways (for ``itemsize > 1``) and the smaller kept.

    Args:
      data: The chunk's C-order bytes.
      threads: Threads for this one chunk (0: the calling thread only): Zstandard workers for
        a plain frame, the shuffled blocks' pool otherwise; the stored bytes are the same.
      itemsize: The bytes of one element (shuffling groups them by position; 1: no shuffle).
    """
    source = np.frombuffer(data, np.uint8)
    level = compression.level
    if len(source) <= 2 * _SAMPLE:
        candidates = [([memoryview(_compressor(level).compress(source))], "zstd")]
        if itemsize > 1:
            candidates.append((_shuffled(source, itemsize, level), "zstd-shuffle"))
        out, codec = min(candidates, key=lambda c: sum(map(len, c[0])))
    else:
        size, plain, shuffled = _sample(source, itemsize, level)
        if min(plain, shuffled) >= size * _WORTH:
            return None
        if shuffled < plain * _SHUFFLE_PAYS:
            out, codec = _shuffled(source, itemsize, level, threads), "zstd-shuffle"
        else:
            compressor = _compressor(level, threads if threads > 1 else 0)
            out, codec = [memoryview(compressor.compress(source))], "zstd"
    return (out, codec) if sum(map(len, out)) < len(data) else None


def _fill(reader: Any, out: memoryview) -> int:
    """Reads from a decompressing stream until ``out`` is full or the frame ends."""
    filled = 0
    while filled < len(out):
        n = reader.readinto(out[filled:])
        if n == 0:
            break
        filled += n
    return filled


def _frame_into(zstd: Any, frame: memoryview, out: memoryview) -> int:
    """Decompresses one frame into ``out``; returns the bytes it holds, or ``len(out) + 1``
    when it holds more (never producing more than ``len(out)``)."""
    with zstd.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
        filled = _fill(reader, out)
        if filled == len(out) and reader.read(1):  # a frame that goes on is a bomb
            return filled + 1
    return filled


def _damage(codec: str, message: str, stored: memoryview, where: str, leaf: str,
            cause: Exception | None = None) -> CorruptCheckpointError:
    error = CorruptCheckpointError(
        f"a {codec} chunk of {len(stored)} stored bytes {message}; the checkpoint is damaged "
        "or hostile: restore an earlier checkpoint", path=where, leaf=leaf)
    error.__cause__ = cause
    return error


def _plane_into(zstd: Any, stored: memoryview, out: np.ndarray, n: int) -> int:
    """Decodes one stored plane (``n`` bytes: raw; fewer: a frame of ``n`` bytes) into the
    strided ``out``; returns the bytes its frame holds (``n`` unless damaged)."""
    if len(stored) == n:
        out[...] = np.frombuffer(stored, np.uint8)
        return n
    size = zstd.frame_content_size(stored)
    if size == n:  # the writers' case: one call, allocating exactly n bytes
        plane = zstd.ZstdDecompressor().decompress(stored, max_output_size=n,
                                                   allow_extra_data=False)
        out[...] = np.frombuffer(plane, np.uint8)
        return len(plane)
    if size >= 0:
        return size
    scratch = _scratch(n)
    filled = _frame_into(zstd, stored, memoryview(scratch.data))
    if filled == n:
        out[...] = scratch
    return filled


def _unshuffle_chunk(zstd: Any, stored: memoryview, out: memoryview, itemsize: int,
                     damage: Any) -> None:
    """Decodes a ``zstd-shuffle`` chunk's table and planes into ``out``, block by block."""
    elements = len(out) // itemsize
    lengths = np.minimum(SHUFFLE_ELEMENTS, elements - np.arange(
        0, elements, SHUFFLE_ELEMENTS, dtype=np.int64)).repeat(itemsize)
    table = len(lengths) * _TABLE_ENTRY
    if len(stored) < table:
        raise damage("is shorter than its table of plane sizes")
    sizes = np.frombuffer(stored[:table], "<u4").astype(np.int64)
    if (sizes < 1).any() or (sizes > lengths).any() or table + int(sizes.sum()) != len(stored):
        raise damage("has a table of plane sizes that does not match its planes")
    target = np.frombuffer(out, np.uint8)
    position = table
    for p, (size, n) in enumerate(zip(sizes.tolist(), lengths.tolist())):
        block, k = divmod(p, itemsize)
        begin = block * SHUFFLE_ELEMENTS * itemsize
        got = _plane_into(zstd, stored[position : position + size],
                          target[begin + k : begin + n * itemsize : itemsize], n)
        if got != n:
            raise damage(f"has a plane frame that decompresses to "
                         f"{'more than ' + str(n) if got > n else got} bytes, its logical size "
                         f"is {n}")
        position += size


def decode_into(stored: memoryview, codec: str, out: memoryview, *, leaf: str,
                where: str, itemsize: int = 1) -> None:
    """Decodes a chunk's (checksum-verified) stored bytes into ``out``, exactly its logical
    size, never producing more.

    Args:
      itemsize: The bytes of one element of the chunk's dtype (``zstd-shuffle`` needs it).

    Raises:
      CorruptCheckpointError: An unknown codec, a malformed frame or table, or a frame that
        holds more or fewer bytes than its logical size (naming the leaf).
      KeepaxError: ``zstandard`` is not installed.
    """
    if codec not in ("zstd", "zstd-shuffle"):  # parse_chunk_extras admits no other
        raise CorruptCheckpointError(f"unknown codec {codec!r:.40}", path=where, leaf=leaf)
    if codec == "zstd-shuffle" and (itemsize < 1 or len(out) % itemsize):
        raise CorruptCheckpointError(f"a {codec} chunk of {len(out)} bytes is not a whole "
                                     f"number of {itemsize}-byte elements", path=where, leaf=leaf)
    zstd = zstandard()

    def damage(message: str, cause: Exception | None = None) -> CorruptCheckpointError:
        return _damage(codec, message, stored, where, leaf, cause)

    try:
        if codec == "zstd-shuffle":
            _unshuffle_chunk(zstd, stored, out, itemsize, damage)
            return
        filled = _frame_into(zstd, stored, out)
    except zstd.ZstdError as e:
        raise damage(f"does not decompress ({e})", e) from e
    if filled != len(out):
        size = f"more than {len(out)}" if filled > len(out) else str(filled)
        raise damage(f"decompresses to {size} bytes, its logical size is {len(out)}")
