"""Single-file checkpoints: one safetensors file holding a keepax manifest and its arrays.

For small states (an optimizer's memory, accumulated matrices, best parameters, a history)
where a directory per checkpoint is more than needed. The file is a valid safetensors file
whose ``__metadata__`` carries the container's format name and version, the keepax manifest
(docs/FORMAT.md §5) as a JSON string and that string's CRC-32C; the manifest's single data
file is the file itself, with absolute chunk offsets. The normative description is
docs/FORMAT.md §13.

Saving reuses :func:`plan_leaves` (how leaves are stored); loading presents the file
to :func:`restoring.restore_manifest` as a checkpoint whose only data file is the file itself,
so ``like``, ``select``, ``partial`` and ``dtype`` behave exactly as in ``keepax.restore``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from keepax._src.checkpoint import container, inspection, opening, restoring, saving
from keepax._src.checkpoint.plan import plan_leaves
from keepax._src.commit.protocol import SaveResult
from keepax._src.format import datafiles as format
from keepax._src.io import (
    LocalStorage,
    MemoryStorage,
    Reader,
    Storage,
    Writer,
    is_hidden_name,
    split_checkpoint_path,
)
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    KeepaxError,
)

__all__ = ["inspect", "inspect_file", "load_file", "save_file"]

_TEMP_TAG = ".keepax-tmp-"
_TEMP_RE = re.compile(r"\.keepax-tmp-[0-9a-f]{12}")


# ---------------------------------------------------------------------------------------------
# Save.


def save_file(
    path: str | os.PathLike[str],
    tree_: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> SaveResult:
    """Saves a pytree as one file, durably and atomically.

    Meant for small states (the file is assembled in host memory): an optimizer's state,
    accumulated matrices, best parameters and cost, normaliser scales, a history of dicts.
    Leaves are stored as by :func:`keepax.save` (arrays as arrays, Python values exactly, no
    pickle), so ``jax.Array``s nested in a history list need no conversion. The file is a
    valid safetensors file (docs/FORMAT.md §13).

    The file is written to a hidden sibling (``<name>.keepax-tmp-<hex>``), fsynced, renamed
    into place and the directory fsynced: a crash leaves either the old file (or none) or the
    complete new one. The temporary a crashed save left behind is removed by the next
    ``save_file`` to the same path (saves to one directory hold a lock on it while they
    write, so a temporary found there under the lock belongs to no running save).

    Args:
      path: The file to create: a local path (or ``memory://store/name``).
      tree_: Any pytree :func:`keepax.save` accepts.
      metadata: JSON-serialisable user metadata stored in the manifest.
      overwrite: Replace an existing file at ``path`` (atomically: if this save fails, the old
        file is intact).

    Returns:
      What was written.

    Raises:
      CheckpointExistsError: ``path`` exists and ``overwrite`` is false, or is a directory.
      UnsupportedLeafError: a leaf (named by key path) cannot be stored.
      KeepaxError: ``path`` is not a local path, or ``metadata`` is not JSON-serialisable.
    """
    began = time.perf_counter()
    storage, name, where = _locate(path)
    if is_hidden_name(name):
        raise KeepaxError(
            "file names must not contain '.keepax-' (reserved for temporary files)", path=where
        )
    if jax.process_count() > 1:
        raise KeepaxError(
            "keepax.save_file is single-process: in a multi-process run no process holds every "
            "shard; save a checkpoint directory instead",
            path=where,
        )
    if storage.is_dir(name):
        raise CheckpointExistsError(
            "a directory exists here; save_file writes a single file and never replaces a "
            "directory: choose another name",
            path=where,
        )
    if storage.exists(name) and not overwrite:
        raise CheckpointExistsError(
            "a file already exists here; pass overwrite=True to replace it", path=where
        )
    metadata = saving.check_metadata(metadata, where)
    plan = plan_leaves(tree_)
    # CRCs go into the header, which precedes the data: take every chunk to host memory first.
    views = [container.chunk_bytes(source) for source in plan.sources]
    crcs = [format.checksum(view) for view in views]
    header = container.header(plan, crcs, metadata, time.time())
    size = len(header) + sum(len(v) for v in views)
    _write(storage, name, where, [memoryview(header), *views], overwrite=overwrite)
    return SaveResult(where, size, 1, time.perf_counter() - began)


def _locate(path: str | os.PathLike[str]) -> tuple[Storage, str, str]:
    """The storage holding ``path``, the file's name in it, and the path for messages."""
    text = os.fspath(path)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme == "file":
        text = text[len("file://") :]
    if scheme not in (None, "file", "memory"):
        raise KeepaxError(
            f"single-file checkpoints are written to local paths (or memory://) only, not "
            f"{scheme}:// URLs; save to a local file and copy it, or use keepax.save",
            path=text,
        )
    try:
        storage, name = split_checkpoint_path(text)
    except ValueError as e:
        raise KeepaxError(str(e), path=text) from e
    return storage, name, storage.display(name)


def _write(
    storage: Storage, name: str, where: str, parts: list[memoryview], *, overwrite: bool
) -> None:
    """Writes a file atomically: temporary sibling, fsync, rename, fsync of the directory."""
    if isinstance(storage, MemoryStorage):
        # An in-memory file appears whole when its writer closes, so no temporary is needed;
        # the no-replace check above is made before writing (in-process stores only).
        _write_parts(storage.create(name), parts)
        return
    if not isinstance(storage, LocalStorage):
        raise KeepaxError("single-file checkpoints are local files only", path=where)
    with _directory_lock(os.path.dirname(os.path.join(storage.root, name))) as locked:
        if locked:
            _remove_stale_temps(storage, name)
        temp = f"{name}{_TEMP_TAG}{uuid.uuid4().hex[:12]}"
        try:
            _write_parts(storage.create(temp), parts)  # fsynced on close
            source, target = os.path.join(storage.root, temp), os.path.join(storage.root, name)
            if overwrite:
                os.replace(source, target)
            else:
                try:
                    storage.rename_dir(temp, name)  # renameat2(RENAME_NOREPLACE); works on files
                except FileExistsError as e:
                    raise CheckpointExistsError(
                        "another save created this file first; pass overwrite=True to replace "
                        "it",
                        path=where,
                    ) from e
            storage.sync_dir("")
        except BaseException:
            try:
                storage.delete(temp)
            except OSError:
                pass  # A leftover temporary is hidden; the next save_file here removes it.
            raise


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[bool]:
    """Holds an exclusive ``flock`` on a directory: ``save_file``s into one directory write one
    at a time, so a temporary found while holding it is a crashed save's. The kernel releases
    the lock of a process that dies. Where directories cannot be locked (some network file
    systems), saves go ahead unlocked (yielding False) and leave stale temporaries alone."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False  # the directory is missing: storage.create makes it; it holds no temporary
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = -1
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _remove_stale_temps(storage: Storage, name: str) -> None:
    """Deletes the temporaries (``<name>.keepax-tmp-<12 hex>`` files) of crashed saves of
    ``name``. Called with the directory locked (see :func:`_directory_lock`)."""
    parent, _, base = name.rpartition("/")
    for entry in storage.list(parent):
        if entry.startswith(base) and _TEMP_RE.fullmatch(entry[len(base):]):
            path = f"{parent}/{entry}" if parent else entry
            if not storage.is_dir(path):  # directory staging belongs to keepax.save
                try:
                    storage.delete(path)
                except OSError:
                    pass  # not ours to insist on: it stays hidden


def _write_parts(writer: Writer, parts: list[memoryview]) -> None:
    try:
        writer.writev(parts)
    except BaseException:
        writer.abort()
        raise
    writer.close()


# ---------------------------------------------------------------------------------------------
# Load.


def load_file(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    with_metadata: bool = False,
) -> Any:
    """Loads a file written by :func:`save_file`.

    ``like``, ``select``, ``partial`` and ``dtype`` mean exactly what they mean for
    :func:`keepax.restore`: with ``like``, the same structure comes back, arrays as the
    ``like`` leaf's kind (``jax.Array`` placed on its sharding, or NumPy), strictly checked;
    without it, nested dicts, lists and tuples of NumPy arrays and Python values. Every chunk
    read is checked against its CRC-32C.

    Args:
      path: The file: a local path (or ``memory://store/name``).
      like: Optional template tree (see :func:`keepax.restore`).
      select: Load only these subtrees (``"params/dense"`` or tuples of keys).
      partial: With ``like``, allow the file to hold leaves ``like`` lacks.
      dtype: ``None``, ``"like"``, or a floating-point dtype to cast to.
      with_metadata: Return ``(tree, metadata)``: also the ``metadata`` given to
        :func:`save_file` (``{}`` if none was).

    Returns:
      The loaded tree, or ``(tree, metadata)`` with ``with_metadata``.

    Raises:
      CheckpointNotFoundError: no file at ``path`` (or a directory).
      CorruptCheckpointError: the file is damaged (truncated, bad header, checksum mismatch,
        naming the leaf) or is not a keepax single-file checkpoint.
      FormatVersionError: the file was written by a newer major version of the format.
      TreeMismatchError: ``like`` does not match; the message lists every offending leaf.
    """
    storage, name, where = _locate(path)
    reader = _open_file(storage, name, where)
    try:
        manifest = container.read_manifest(reader, name, where)
        tree_ = restoring.restore_manifest(
            container.ThisFile(reader, storage.url, name),
            name,
            where,
            manifest,
            like,
            select=select,
            partial=partial,
            dtype=dtype,
        )
    finally:
        reader.close()
    return (tree_, manifest.metadata) if with_metadata else tree_


def inspect_file(path: str | os.PathLike[str]) -> inspection.CheckpointInfo:
    """Describes a single-file checkpoint as :func:`keepax.inspect` describes a directory:
    structure, shapes, dtypes, sizes and the metadata given to :func:`save_file`, without
    reading array data.

    Raises:
      CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError: as
        :func:`load_file`.
    """
    storage, name, where = _locate(path)
    reader = _open_file(storage, name, where)
    try:
        manifest = container.read_manifest(reader, name, where)
    finally:
        reader.close()
    return inspection.info_of(opening.opened_manifest(storage, name, where, manifest))


def _open_file(storage: Storage, name: str, where: str) -> Reader:
    """Opens a single-file checkpoint, refusing temporaries and directories."""
    if is_hidden_name(name):
        raise CheckpointNotFoundError(
            "this is the temporary file of a save_file that has not finished, never a "
            "checkpoint",
            path=where,
        )
    if storage.is_dir(name):
        raise CheckpointNotFoundError(
            "this is a directory, not a single-file checkpoint; restore checkpoint directories "
            "with keepax.restore",
            path=where,
        )
    try:
        return storage.open(name)
    except FileNotFoundError:
        raise CheckpointNotFoundError("the file does not exist", path=where) from None


def inspect(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> inspection.CheckpointInfo:
    """Describes a checkpoint without reading array data: a checkpoint directory (or URL), or
    a single file written by :func:`save_file`.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError.
    """
    if os.path.isfile(os.fspath(path)):
        return inspect_file(path)
    return inspection.inspect(os.fspath(path), storage_options=storage_options)
