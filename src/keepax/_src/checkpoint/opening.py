"""Opening a committed checkpoint: its commit marker and manifest are read and checked once,
into an :class:`Opened` record that restore, inspect and verify all read from.

A checkpoint can vanish while it is read (a manager's retention deletes it: renamed to a
hidden trash name, or, on object stores, its commit marker deleted first). What goes missing
then is reported as :class:`~keepax.errors.CheckpointNotFoundError`, not as damage
(:func:`vanishing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Iterator
from typing import Any

from keepax._src.format import datafiles as format
from keepax._src.format import tree
from keepax._src.format.manifest import (
    COMMIT_FILE,
    MANIFEST_FILE,
    CommitMarker,
    Manifest,
    ValueLeaf,
)
from keepax._src.io import Storage, is_hidden_name, split_checkpoint_path
from keepax._src.io.base import STAGING_TAG
from keepax.errors import CheckpointNotFoundError, CorruptCheckpointError, NotCommittedError

__all__ = ["Opened", "check_tree", "is_gone", "open_path", "opened_manifest", "vanishing"]

_MAX_MARKER_BYTES = 64 << 10

_UNFINISHED_TAG = f"{STAGING_TAG}tmp-"
"""What follows a checkpoint's name in the name of a save's staging directory
(``Storage.staging_name``); the other hidden siblings are trash: a checkpoint being deleted
(``.keepax-trash-``) or replaced (``.keepax-old-``)."""

_DELETED = (
    "the checkpoint was deleted while being read (e.g. by a manager's retention); restore "
    "another checkpoint"
)


@dataclasses.dataclass(frozen=True)
class Opened:
    """A checkpoint whose manifest is read and checked.

    Attributes:
      storage: Where it is.
      name: Its name in ``storage`` (the directory its data files are under).
      where: Its path for messages.
      manifest: The validated manifest.
      key_paths: Each leaf's key path in the tree.
      committed: Whether this is a committed directory (its commit marker read), which may be
        deleted while being read; false for a single-file checkpoint.
    """

    storage: Storage
    name: str
    where: str
    manifest: Manifest
    key_paths: dict[int, tree.KeyPath]
    committed: bool = True


def open_path(path: str, storage_options: dict[str, Any] | None = None) -> Opened:
    """Reads and checks a committed checkpoint's commit marker and manifest.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint is missing, incomplete, damaged or too new.
    """
    storage, name = split_checkpoint_path(path, storage_options)
    where = storage.display(name)
    if is_hidden_name(name):
        raise CheckpointNotFoundError(
            "this is keepax's temporary staging (or trash) directory, never a checkpoint",
            path=where,
        )
    if not storage.is_dir(name):
        kind = "is a file, not a checkpoint directory" if storage.exists(name) else "does not exist"
        hint = " (a save to it started but never finished)" if _save_pending(storage, name) else ""
        raise CheckpointNotFoundError(f"the checkpoint {kind}{hint}", path=where)
    marker = CommitMarker.from_json(_read_marker(storage, name, where), where=where)
    try:
        manifest_bytes = _read_small(
            storage, f"{name}/{MANIFEST_FILE}", marker.manifest_nbytes, where
        )
    except FileNotFoundError:
        if not storage.exists(f"{name}/{COMMIT_FILE}"):
            raise CheckpointNotFoundError(_DELETED, path=where) from None
        raise CorruptCheckpointError(
            f"{MANIFEST_FILE} is missing from a committed checkpoint", path=where
        ) from None
    if (
        len(manifest_bytes) != marker.manifest_nbytes
        or format.checksum(manifest_bytes) != marker.manifest_crc32c
    ):
        raise CorruptCheckpointError(
            f"{MANIFEST_FILE} does not match its checksum in {COMMIT_FILE} (truncated or "
            "modified); the checkpoint is damaged: restore an earlier one",
            path=where,
        )
    manifest = Manifest.from_json(manifest_bytes, where=where)
    if manifest.version[0] != marker.version[0]:
        raise CorruptCheckpointError(
            f"{COMMIT_FILE} and {MANIFEST_FILE} disagree on the format version", path=where
        )
    return Opened(storage, name, where, manifest, check_tree(manifest, where))


def opened_manifest(storage: Storage, name: str, where: str, manifest: Manifest) -> Opened:
    """An :class:`Opened` record of a manifest read some other way (a single-file
    checkpoint, whose data file ``storage`` opens under ``name``).

    Raises:
      CorruptCheckpointError: the manifest's tree and leaves disagree.
    """
    return Opened(storage, name, where, manifest, check_tree(manifest, where), committed=False)


def _save_pending(storage: Storage, name: str) -> bool:
    """Whether a save's staging directory for ``name`` lies beside it (trash does not count:
    it is what a deletion or a replacement leaves)."""
    parent = name.rpartition("/")[0]
    if parent and not storage.exists(parent):
        return False
    return any(n.startswith(f"{name}{_UNFINISHED_TAG}") for n in storage.list(parent))


def _read_marker(storage: Storage, name: str, where: str) -> bytes:
    """The commit marker's bytes.

    Raises:
      NotCommittedError: the directory holds an unfinished save.
      CheckpointNotFoundError: it holds no checkpoint, or was deleted meanwhile.
    """
    try:
        return _read_small(storage, f"{name}/{COMMIT_FILE}", _MAX_MARKER_BYTES, where)
    except FileNotFoundError:
        pass
    try:
        entries = storage.list(name)
    except FileNotFoundError:
        entries = None
    if entries is None or not storage.is_dir(name):
        raise CheckpointNotFoundError(_DELETED, path=where) from None
    if MANIFEST_FILE in entries or "data" in entries:
        raise NotCommittedError(
            f"the save that wrote this checkpoint never finished (no {COMMIT_FILE}); it is "
            "incomplete: delete it, or restore an earlier checkpoint",
            path=where,
        ) from None
    raise CheckpointNotFoundError(
        f"not a keepax checkpoint (no {COMMIT_FILE} or {MANIFEST_FILE})", path=where
    ) from None


def _read_small(storage: Storage, path: str, limit: int, where: str) -> bytes:
    """Reads a whole metadata file, refusing one larger than ``limit`` before reading it."""
    reader = storage.open(path)
    try:
        size = reader.size()
        if size > limit:
            raise CorruptCheckpointError(
                f"{path.rsplit('/', 1)[-1]} has {size} bytes, expected at most {limit}; the "
                "checkpoint is damaged",
                path=where,
            )
        out = bytearray(size)
        n = reader.read_into(0, memoryview(out))
        return bytes(out[:n])
    finally:
        reader.close()


def check_tree(manifest: Manifest, where: str) -> dict[int, tree.KeyPath]:
    """Checks that every leaf appears in the tree exactly once, at the key path it records;
    returns each leaf's key path.

    Raises:
      CorruptCheckpointError: naming the first inconsistency.
    """
    names: dict[int, str] = {}
    try:
        paths = tree.leaf_paths(manifest.tree, names)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"invalid tree: {e}", path=where) from None
    leaves = manifest.leaves
    # Distinct indices >= 0, as many as the leaves, all below their count: exactly range(n).
    if len(paths) != len(leaves) or (paths and max(paths) >= len(leaves)):
        raise CorruptCheckpointError(
            f"the tree names {len(paths)} leaves, the manifest lists {len(leaves)}",
            path=where,
        )
    for index, name in names.items():
        if name != leaves[index].path:
            raise CorruptCheckpointError(
                f"leaf {index} is recorded as {leaves[index].path!r} but sits at "
                f"{tree.keystr(paths[index])!r} in the tree",
                path=where,
            )
    return paths


def is_gone(opened: Opened) -> bool:
    """Whether a committed checkpoint has been deleted since it was opened (its commit marker,
    which a deletion removes or renames away first, is no longer at its name)."""
    if not opened.committed:
        return False
    try:
        return not opened.storage.exists(f"{opened.name}/{COMMIT_FILE}")
    except OSError:
        return False


@contextlib.contextmanager
def vanishing(opened: Opened) -> Iterator[None]:
    """Reports a checkpoint deleted while its data is read as not found, not as damaged.

    Raises:
      CheckpointNotFoundError: a file was missing (or short) because the checkpoint was
        deleted meanwhile.
      CorruptCheckpointError: the checkpoint is still there, and damaged.
    """
    try:
        yield
    except (CorruptCheckpointError, FileNotFoundError) as e:
        if is_gone(opened):
            raise CheckpointNotFoundError(_DELETED, path=opened.where) from e
        raise


def decode_value(leaf: ValueLeaf, where: str) -> Any:
    """The Python value a value leaf stores.

    Raises:
      CorruptCheckpointError: the stored value is not of its recorded kind.
    """
    v, kind = leaf.value, leaf.type
    try:
        if kind == "bool" and isinstance(v, bool):
            return v
        if kind == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "float" and isinstance(v, str):
            return tree.decode_float(v)
        if kind == "complex" and isinstance(v, list) and len(v) == 2:
            return complex(tree.decode_float(v[0]), tree.decode_float(v[1]))
    except (ValueError, TypeError, struct.error):
        pass
    raise CorruptCheckpointError(f"invalid {kind} value {v!r:.60}", path=where, leaf=leaf.path)
