"""The handle to one opened checkpoint: its manifest is read and validated once, then
``info``, ``restore``, ``iter_leaves`` and ``verify`` all work from it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from keepax._src.checkpoint import inspection, restoring, stateful
from keepax._src.checkpoint.deadline import Deadline
from keepax._src.checkpoint.inspection import CheckpointInfo, LeafInfo
from keepax._src.checkpoint.opening import Opened, open_path
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax._src.checkpoint.templates import Shardings
from keepax._src.format.manifest import ArrayLeaf, Manifest
from keepax._src.format.reading import RestoreStats

__all__ = ["Checkpoint", "ChunkInfo", "open_checkpoint", "restore"]


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
        timeout: float | None = None,
    ) -> Any:
        """Restores the checkpoint; arguments as for :func:`keepax.restore` (``timeout``
        bounds the reads from now on: the manifest was read when the handle was made)."""
        return self._restore_within(
            Deadline(timeout, self.path), like, select=select, partial=partial, dtype=dtype,
            transform=transform, shardings=shardings, types=types, per_process=per_process,
            stats=stats)

    def _restore_within(self, deadline: Deadline, like: Any, *, partial: bool,
                       **options: Any) -> Any:
        """:meth:`restore` with its storage reads bounded by ``deadline``."""
        options["deadline"] = deadline
        if like is not None and stateful.has_objects(like):
            return stateful.restore_objects(self.info, like, self._restore, partial=partial,
                                            **options)
        return self._restore(like, partial=partial, **options)

    def _restore(self, like: Any, **options: Any) -> Any:
        return restoring.restore_opened(self._opened, like, **options)

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


def restore(
    path: str,
    like: Any = None,
    *,
    select: restoring.Select = None,
    partial: bool = False,
    dtype: Any = None,
    transform: restoring.Transform | None = None,
    shardings: Shardings | None = None,
    types: Sequence[type] = (),
    per_process: PerProcessChoice = None,
    stats: RestoreStats | None = None,
    storage_options: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Restores a checkpoint.

    Args:
      path: The checkpoint's path or URL.
      like: Optional pytree of the same structure, whose leaves are arrays (``jax.Array``,
        ``np.ndarray``), ``jax.ShapeDtypeStruct`` (with or without ``sharding``) or values of the
        expected Python types; objects with ``get_state()``/``set_state()`` (data iterators) get
        their saved state and come back in place. Arrays come back as the ``like`` leaf's kind:
        ``jax.Array`` placed on its sharding (the default device when it has none), or NumPy; a
        Python scalar and a 0-d array are interchangeable (the result is the like's kind, with the
        saved value exactly). Containers match by field names, so a namedtuple, dataclass or flax
        struct restores into a dict with the same keys and back (the trees :func:`restore` and
        :func:`inspect` hand out included). Without ``like``, the tree comes back as nested dicts,
        lists and tuples of NumPy arrays and Python values (namedtuples, dataclasses and custom
        nodes as dicts, unless named in ``types``).
      select: Restore only these subtrees: key paths given as ``"params/dense"`` (``str()`` of
        each key) or as tuples of keys. Other leaves' bytes are not read. Without ``like``,
        the result holds exactly what was selected; a list selected in part becomes a dict
        keyed by position, so ``out["layers"][3]`` is always layer 3.
      partial: With ``like``, allow the checkpoint to hold leaves ``like`` lacks (they are not
        read). Leaves in ``like`` but not in the checkpoint are always an error.
      dtype: ``None`` (default): dtypes must match ``like`` exactly. ``"like"``: cast each leaf
        to its ``like`` dtype. A dtype (e.g. ``jnp.bfloat16``): cast every floating-point
        array to it, whatever ``like`` says (the result has that dtype, placed on ``like``'s
        shardings); integers are never cast unless ``dtype="like"``.
      transform: Called as ``transform(key_path, value)`` on each leaf as it arrives; its
        result replaces the leaf (e.g. a cast or a quantisation), so the tree is never held
        twice.
      shardings: Without ``like``: where to place arrays, as ``jax.Array``s. A function
        ``(name, leaf_info) -> Sharding | None`` (``name`` like ``"params/dense/kernel"``,
        ``leaf_info`` a :class:`LeafInfo`; None keeps the leaf in NumPy), or a sequence of
        ``(regex, Sharding)`` rules, the first whose regex matches ``name`` (``re.search``)
        applying.
      types: Without ``like``: the namedtuple and dataclass types (flax structs, optax
        states, ...) the caller trusts; containers saved from these classes come back as
        them instead of dicts. keepax never imports or calls anything a checkpoint names.
      per_process: Which copy of each :class:`keepax.PerProcess` value to restore: None
        (default) this process's own (the checkpoint must have been saved by as many
        processes as this run has), ``k`` process ``k``'s on every process, or ``"all"`` the
        list of every process's copy.
      stats: If given, filled with what was read.
      storage_options: For URLs (``s3://...``): fsspec options and keepax's ``keepax_*``
        transfer options, as for :func:`save`.
      timeout: Seconds the restore may wait for storage (None: no limit); past it, it raises
        instead of hanging on a stalled mount or store (README, *Many processes*).

    Returns:
      The restored tree.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint is missing, incomplete, damaged or too new.
      TreeMismatchError: ``like`` does not match; the message lists every offending leaf.
      KeepaxError: a per-process value was saved by another number of processes and
        ``per_process`` does not say which copy to take (the message names the leaf); or the
        restore did not finish within ``timeout`` (the message names the phase).
    """
    deadline = Deadline(timeout, str(path))
    opened = deadline.run("reading the manifest", lambda: open_path(path, storage_options))
    return Checkpoint(opened)._restore_within(
        deadline, like, select=select, partial=partial, dtype=dtype, transform=transform,
        shardings=shardings, types=types, per_process=per_process, stats=stats,
    )
