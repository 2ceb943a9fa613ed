"""Describing a checkpoint without reading its data (:func:`inspect`), and checking every
chunk's checksum (:func:`verify`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from keepax._src.checkpoint.opening import Opened, decode_value, is_gone, open_path, vanishing
from keepax._src.format import datafiles as format
from keepax._src.format import reading, tables, tree
from keepax._src.format.manifest import ArrayLeaf, Manifest
from keepax._src.util import gc_paused
from keepax.errors import CheckpointNotFoundError, KeepaxError

__all__ = [
    "CheckpointInfo", "LeafInfo", "info_of", "inspect", "resolved_manifest", "verify",
    "verify_opened",
]


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One leaf of a checkpoint, as :func:`inspect` describes it.

    Attributes:
      path: Key path (``jax.tree_util.keystr``).
      type: ``jax``, ``numpy``, ``npscalar``, ``bytes``, ``prngkey``, ``int``, ``float``,
        ``bool``, ``complex`` or ``str``.
      shape: Array shape (None for Python values).
      dtype: Dtype name (None for Python values).
      nbytes: Bytes stored in data files.
      chunks: Number of chunks.
      value: For Python values, the value itself; else None.
      sharding: The saved sharding, if the leaf was a sharded ``jax.Array``.
    """

    path: str
    type: str
    shape: tuple[int, ...] | None
    dtype: str | None
    nbytes: int
    chunks: int
    value: Any = None
    sharding: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect` tells about a checkpoint, without reading array data.

    Attributes:
      path: The checkpoint's path or URL.
      format_version: ``"MAJOR.MINOR"``.
      created: Unix time the manifest was written.
      metadata: The user metadata given to ``save``.
      leaves: Every leaf, in flatten order.
      tree: The structure as plain dicts/lists/tuples with :class:`LeafInfo` at the leaves.
      files: (name, size in bytes) of each data file (with per-process chunk tables: of each
        table, which inspect does not read).
      writer: Versions and process count of the writer.
    """

    path: str
    format_version: str
    created: float
    metadata: dict[str, Any]
    leaves: tuple[LeafInfo, ...]
    tree: Any
    files: tuple[tuple[str, int], ...]
    writer: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Total bytes of array data."""
        return sum(leaf.nbytes for leaf in self.leaves)


@gc_paused()
def inspect(path: str, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """Describes a committed checkpoint (structure, shapes, dtypes, sizes, metadata) without
    reading any array data.

    ``storage_options`` are as for :func:`save` (URLs such as ``s3://...`` only).

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError.
    """
    return info_of(open_path(path, storage_options))


@gc_paused()
def info_of(opened: Opened) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of an opened checkpoint (no array data read)."""
    m = opened.manifest
    infos = []
    for leaf in m.leaves:
        if isinstance(leaf, ArrayLeaf):
            infos.append(
                LeafInfo(leaf.path, leaf.type, tuple(leaf.shape), leaf.dtype, leaf.nbytes,
                         _chunk_count(m, leaf), None, leaf.sharding)
            )
        else:
            infos.append(
                LeafInfo(leaf.path, leaf.type, None, None, 0, 0,
                         decode_value(leaf, opened.where))
            )
    return CheckpointInfo(
        path=opened.where,
        format_version=f"{m.version[0]}.{m.version[1]}",
        created=m.created,
        metadata=m.metadata,
        leaves=tuple(infos),
        tree=tree.rebuild_plain(m.tree, infos.__getitem__),
        files=tuple((f.name, f.nbytes) for f in m.files)
        + tuple((t.name, t.nbytes) for t in m.tables),
        writer=m.writer,
    )


def _chunk_count(manifest: Manifest, leaf: ArrayLeaf) -> int:
    """Chunks of a leaf; with chunk tables (not read by ``inspect``), its non-empty cells."""
    if leaf.cells is None:
        return len(leaf.chunks)
    writers = manifest.layouts[leaf.cells.layout].writers
    return sum(1 for w in writers if w) if math.prod(leaf.shape) else 0


def verify(
    path: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Re-reads every chunk of a checkpoint and checks its checksum.

    Args:
      path: The checkpoint's path or URL.
      progress: Called with (bytes checked so far, total bytes) as the check advances.
      storage_options: As for :func:`save` (URLs such as ``s3://...`` only).

    Returns:
      One message per problem found (empty when the checkpoint is sound). Each names the
      data file, the byte range and the leaf.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint cannot be opened at all.
    """
    return verify_opened(open_path(path, storage_options), progress=progress)


def resolved_manifest(opened: Opened) -> Manifest:
    """The manifest with every leaf's chunks listed (per-process chunk tables read in).

    Raises:
      CorruptCheckpointError: a chunk table is missing or damaged.
      CheckpointNotFoundError: the checkpoint was deleted while being read.
    """
    m = opened.manifest
    if not m.tables:
        return m
    whole = {
        i: [((0,) * len(leaf.shape), tuple(leaf.shape))]
        for i, leaf in enumerate(m.leaves)
        if isinstance(leaf, ArrayLeaf)
    }
    with vanishing(opened):
        m, _ = tables.resolve(opened.storage, opened.name, opened.where, m, whole)
    return m


@gc_paused()
def verify_opened(
    opened: Opened, *, progress: Callable[[int, int], None] | None = None
) -> list[str]:
    """:func:`verify` of an opened checkpoint.

    Raises:
      CheckpointNotFoundError: the checkpoint was deleted while being checked (its files
        went missing because it is gone, not because it is damaged).
    """
    try:
        m = resolved_manifest(opened)
    except CheckpointNotFoundError:
        raise
    except KeepaxError as e:
        return [str(e)]
    pieces = [
        (leaf.path, c) for leaf in m.leaves if isinstance(leaf, ArrayLeaf) for c in leaf.chunks
    ]
    with vanishing(opened):
        problems = reading.verify_chunks(
            opened.storage, opened.name, m.files, pieces, where=opened.where, progress=progress
        )
        # Each data file must stay a valid safetensors file naming what the manifest says.
        problems += format.check_headers(opened.storage, opened.name, m, where=opened.where)
    if problems and is_gone(opened):
        raise CheckpointNotFoundError(
            "the checkpoint was deleted while being verified (e.g. by a manager's retention)",
            path=opened.where,
        )
    return problems
