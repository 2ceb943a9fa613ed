"""The handle to one opened checkpoint: its manifest is read and validated once, then
``info``, ``restore``, ``iter_leaves`` and ``verify`` all work from it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from keepax._src.checkpoint import inspection, restoring
from keepax._src.checkpoint.inspection import CheckpointInfo, LeafInfo
from keepax._src.checkpoint.opening import Opened, open_path
from keepax._src.format.datafiles import RestoreStats
from keepax._src.format.manifest import ArrayLeaf, Manifest

__all__ = ["Checkpoint", "ChunkInfo", "open_checkpoint"]


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """One stored chunk of an array leaf.

    Attributes:
      leaf: The leaf's key path.
      box: ``(start, shape)`` of the chunk inside the leaf.
      file: The data file holding it (relative to the checkpoint).
      offset: Absolute byte offset of the chunk in that file.
      nbytes: Stored size in bytes.
      crc32c: The CRC-32C checksum of its bytes.
    """

    leaf: str
    box: tuple[tuple[int, ...], tuple[int, ...]]
    file: str
    offset: int
    nbytes: int
    crc32c: int


class Checkpoint:
    """A committed checkpoint, opened once: read its description, restore it (whole or in
    part), stream its leaves one at a time, or verify it.

    Made by :func:`keepax.open`. The manifest is read and validated when the handle is made;
    data is read only by :meth:`restore`, :meth:`iter_leaves` and :meth:`verify`.
    """

    def __init__(self, opened: Opened) -> None:
        self._opened = opened

    @property
    def path(self) -> str:
        """The checkpoint's path or URL, as errors show it."""
        return self._opened.where

    @property
    def manifest(self) -> Manifest:
        """The validated manifest (format-level detail; most callers want :attr:`info`)."""
        return self._opened.manifest

    @functools.cached_property
    def info(self) -> CheckpointInfo:
        """What :func:`keepax.inspect` returns: structure, shapes, dtypes, sizes, metadata."""
        return inspection.info_of(self._opened)

    @property
    def metadata(self) -> dict[str, Any]:
        """The user metadata given to ``save``."""
        return self._opened.manifest.metadata

    def restore(
        self,
        like: Any = None,
        *,
        select: str | Sequence[str | tuple[Any, ...]] | None = None,
        partial: bool = False,
        dtype: Any = None,
        transform: Callable[[str, Any], Any] | None = None,
        shardings: Any = None,
        types: Sequence[type] = (),
        per_process: Any = None,
        stats: RestoreStats | None = None,
    ) -> Any:
        """Restores the checkpoint; arguments as for :func:`keepax.restore`."""
        return restoring.restore_opened(
            self._opened, like, select=select, partial=partial, dtype=dtype,
            transform=transform, shardings=shardings, types=types, per_process=per_process,
            stats=stats,
        )

    def iter_leaves(
        self, select: str | Sequence[str | tuple[Any, ...]] | None = None
    ) -> Iterator[tuple[LeafInfo, Any]]:
        """Yields ``(LeafInfo, value)`` for each (selected) leaf in flatten order, reading one
        leaf at a time, so memory holds at most one leaf's bytes.

        Arrays come back as whole NumPy arrays (sharded leaves assembled), PRNG keys as their
        key data, Python values as themselves.
        """
        for index in restoring.selected_indices(self._opened, select):
            values = restoring.read_plain(self._opened, [index])
            yield self.info.leaves[index], values[index]
            del values

    def chunks(self, leaf: str | None = None) -> list[ChunkInfo]:
        """The stored chunks with their checksums, of one leaf (by key path) or of all.

        With per-process chunk tables (multi-process saves), the tables are read.
        """
        manifest = inspection.resolved_manifest(self._opened)
        out: list[ChunkInfo] = []
        for entry in manifest.leaves:
            if not isinstance(entry, ArrayLeaf) or (leaf is not None and entry.path != leaf):
                continue
            out.extend(
                ChunkInfo(entry.path, (tuple(c.start), tuple(c.shape)),
                          manifest.files[c.file].name, c.offset, c.stored, c.crc32c)
                for c in entry.chunks
            )
        return out

    def verify(self, *, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Re-reads every chunk and checks its checksum; one message per problem (empty when
        sound), as :func:`keepax.verify`."""
        return inspection.verify_opened(self._opened, progress=progress)

    def __repr__(self) -> str:
        m = self._opened.manifest
        return (f"Checkpoint({self.path!r}, version={m.version[0]}.{m.version[1]}, "
                f"leaves={len(m.leaves)})")


def open_checkpoint(path: str, *, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Opens a committed checkpoint: reads and validates its commit marker and manifest once.

    Args:
      path: The checkpoint's path or URL.
      storage_options: For URLs (``s3://...``), as for :func:`keepax.save`.

    Returns:
      A :class:`Checkpoint` handle.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint is missing, incomplete, damaged or too new.
    """
    return Checkpoint(open_path(path, storage_options))
