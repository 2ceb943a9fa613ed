"""The optional format 1.2 members of a chunk (``codec``, ``stored_nbytes``, ``digest``, block
checksums), parsed from untrusted JSON: shared by the manifest and the chunk tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keepax._src.format import spec
from keepax.errors import CorruptCheckpointError, FormatVersionError

__all__ = ["MAX_CRC32C_BLOCK", "MIN_CRC32C_BLOCK", "parse_block_crcs", "parse_chunk_extras"]


def _nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def parse_chunk_extras(
    entry: dict[str, Any],
    nbytes: int,
    version: tuple[int, int],
    *,
    where: str,
    leaf: str | None,
    fail: Callable[[str], CorruptCheckpointError],
) -> tuple[str, int | None, str | None]:
    """Parses a chunk's optional format 1.2 members: ``codec``, ``stored_nbytes``, ``digest``.

    Args:
      entry: The chunk's JSON object (a manifest chunk, or a chunk table row's extras).
      nbytes: The chunk's logical size, already checked.
      version: The format version of the document holding it.
      where: The checkpoint, for errors.
      leaf: The leaf's path, for errors.
      fail: Builds the error for a malformed member.

    Returns:
      (codec, stored size or None, digest or None).

    Raises:
      FormatVersionError: an unknown codec in a document newer than this keepax knows.
      CorruptCheckpointError: from ``fail``: an unknown codec, a stored size that does not fit
        the codec, or a malformed digest.
    """
    codec = entry.get("codec", "raw")
    if codec not in spec.CODECS:
        if isinstance(codec, str) and version > spec.NEWEST_VERSION:
            raise FormatVersionError(
                f"a chunk uses codec {codec!r:.40}, unknown to this keepax (it reads format "
                f"{spec.version_text(spec.NEWEST_VERSION)} and codecs "
                f"{', '.join(spec.CODECS)}), in a checkpoint of format "
                f"{spec.version_text(version)}; upgrade keepax to read it",
                path=where, leaf=leaf,
            )
        raise fail(f"unknown codec {codec!r:.40} (format {spec.version_text(version)} knows "
                   f"{', '.join(spec.CODECS)})")
    if spec.CODEC_VERSIONS[codec] > version:
        raise fail(f"codec {codec!r} needs format {spec.version_text(spec.CODEC_VERSIONS[codec])}"
                   f" or later, not {spec.version_text(version)}")
    stored = entry.get("stored_nbytes")
    if codec == "raw":
        if stored is not None and (not _nat(stored) or stored != nbytes):
            raise fail(f"stored_nbytes {stored!r:.40} must equal nbytes {nbytes} for a raw chunk")
    elif not _nat(stored) or stored == 0 or nbytes == 0:
        raise fail(f"a {codec} chunk needs stored_nbytes >= 1 (got {stored!r:.40}) and nbytes "
                   f">= 1 (got {nbytes})")
    digest = entry.get("digest")
    if digest is not None and not (
        isinstance(digest, str) and len(digest) <= 161 and spec.DIGEST_RE.fullmatch(digest)
    ):
        raise fail(f"digest {digest!r:.60} is not '<algorithm>:<lowercase hex>'")
    return codec, stored, digest


MIN_CRC32C_BLOCK = 1 << 10
MAX_CRC32C_BLOCK = 1 << 30


def parse_block_crcs(
    entry: dict[str, Any], nbytes: int, codec: str, fail: Callable[[str], CorruptCheckpointError]
) -> tuple[int, tuple[int, ...]]:
    """Parses a chunk's optional 1.2 block checksums, ``crc32c_block`` and ``crc32c_blocks``
    (``docs/FORMAT.md`` §5.4).

    Returns:
      (block size, per-block CRC-32Cs), or ``(0, ())`` when the chunk has none.

    Raises:
      CorruptCheckpointError: from ``fail``: one member without the other, a block size that
        is not a power of two in [2**10, 2**30], a list of the wrong length or with values
        outside [0, 2**32), or block checksums on a chunk whose codec is not ``raw``.
    """
    block, crcs = entry.get("crc32c_block"), entry.get("crc32c_blocks")
    if block is None and crcs is None:
        return 0, ()
    if not (type(block) is int and MIN_CRC32C_BLOCK <= block <= MAX_CRC32C_BLOCK
            and block & (block - 1) == 0):
        raise fail(f"crc32c_block {block!r:.40} must be a power of two from "
                   f"{MIN_CRC32C_BLOCK} to {MAX_CRC32C_BLOCK}")
    if codec != "raw":
        raise fail(f"crc32c_blocks are defined for raw chunks only, not codec {codec!r:.40}")
    count = -(-nbytes // block)
    if not (isinstance(crcs, list) and len(crcs) == count
            and all(type(x) is int and 0 <= x < 1 << 32 for x in crcs)):
        raise fail(f"crc32c_blocks must be a list of {count} integers in [0, 2**32) (one per "
                   f"{block} bytes of the chunk)")
    return block, tuple(crcs)
