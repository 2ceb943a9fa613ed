"""Chunk codecs (format 1.2 ``codec``): ``raw`` and ``zstd`` (opt-in compression).

A ``zstd`` chunk's stored bytes are one Zstandard frame (RFC 8878) whose content is the chunk's
C-order bytes. Writers compress each chunk on its own (so chunks compress in parallel and a
restore reads only the chunks it needs) and keep a chunk ``raw`` when compression does not make
it smaller. Readers decompress straight into the output array and never produce more than the
chunk's logical size: a frame that holds more or fewer bytes is damage.

The ``zstandard`` package (the ``zstd`` extra) is imported only when a save compresses or a
restore meets a compressed chunk.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = ["Compression", "parse_compression", "compress", "decode_into", "zstandard"]

_LEVELS = range(-7, 23)
"""Zstandard levels accepted: negative (fastest) to 22 (smallest)."""
DEFAULT_LEVEL = 1
"""Level 1: ~650 MB/s per core on float weights, 2-4x level 3's speed for ratios within
0.2 % of it on float, bf16 and zero-heavy states (BENCHMARKS.md); Orbax's ratios too."""
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


def compress(data: memoryview, compression: Compression, threads: int = 0) -> bytes | None:
    """The stored bytes of a chunk under ``compression``, or None when they would not be
    smaller than ``data`` (the chunk is then stored ``raw``). Releases the GIL.

    Args:
      threads: Zstandard worker threads for this one chunk (0: the calling thread only); the
        output is one frame either way.
    """
    out: bytes = _compressor(compression.level, threads if threads > 1 else 0).compress(data)
    return out if len(out) < len(data) else None


def decode_into(stored: memoryview, codec: str, out: memoryview, *, leaf: str,
                where: str) -> None:
    """Decodes a chunk's (checksum-verified) stored bytes into ``out``, exactly its logical
    size, never producing more.

    Raises:
      CorruptCheckpointError: The frame is malformed or holds more or fewer bytes than
        ``len(out)`` (naming the leaf).
      KeepaxError: ``zstandard`` is not installed.
    """
    if codec != "zstd":  # parse_chunk_extras admits no other
        raise CorruptCheckpointError(f"unknown codec {codec!r:.40}", path=where, leaf=leaf)
    zstd = zstandard()
    filled, extra = 0, b""
    try:
        with zstd.ZstdDecompressor().stream_reader(stored, read_across_frames=False) as reader:
            while filled < len(out):
                n = reader.readinto(out[filled:])
                if n == 0:
                    break
                filled += n
            if filled == len(out):
                extra = reader.read(1)  # a frame that goes on is a decompression bomb
    except zstd.ZstdError as e:
        raise CorruptCheckpointError(
            f"a zstd chunk of {len(stored)} stored bytes does not decompress ({e}); the data "
            "file is damaged: restore an earlier checkpoint", path=where, leaf=leaf) from e
    if filled != len(out) or extra:
        size = f"more than {len(out)}" if extra else str(filled)
        raise CorruptCheckpointError(
            f"a zstd chunk decompresses to {size} bytes, its logical size is {len(out)}; the "
            "checkpoint is damaged or hostile: restore an earlier checkpoint",
            path=where, leaf=leaf)
