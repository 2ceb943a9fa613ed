"""The one commit protocol, shared by single-process, multi-process and host-local saves.

A checkpoint is written in four moves (``docs/FORMAT.md`` §Commit):

1. :func:`begin`: the final name is prepared (marker backends delete an old checkpoint's
   commit marker first) and a place to write is chosen: a hidden staging directory beside the
   final name (rename backends) or the final name itself (marker backends).
2. The caller writes the data files (and chunk tables) under :attr:`Staging.path` and makes
   them durable.
3. :func:`commit`: the manifest, then the commit marker (the last file written), then the
   staging directory is renamed into place (rename backends, which make the manifest and
   marker durable together just before; marker backends are done once the marker is
   written, after the manifest is durable).
4. On any failure before the commit, :func:`discard` removes the staging directory (a leftover
   one is invisible to readers anyway: its name is hidden).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import time
from collections.abc import Callable, Iterator

from keepax._src.format import datafiles
from keepax._src.format.manifest import (
    COMMIT_FILE,
    DATA_DIR,
    MANIFEST_FILE,
    CommitMarker,
    Manifest,
)
from keepax._src.io import Storage, Writer
from keepax.errors import CheckpointExistsError

__all__ = [
    "SaveResult", "Staging", "begin", "begin_write", "commit", "discard", "is_unfinished",
    "staged",
]

_EXISTS = "another save created this checkpoint first; pass overwrite=True to replace it"


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What a save wrote.

    Attributes:
      path: The checkpoint's path or URL.
      bytes_written: Bytes of data files, manifest and marker.
      files: Number of data files.
      seconds: Wall time of the save.
    """

    path: str
    bytes_written: int
    files: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Staging:
    """A checkpoint being written, not yet committed.

    Attributes:
      storage: Where it goes.
      name: Its final name in ``storage``.
      where: Its path for messages.
      path: Where its files are written until the commit (``name`` on marker backends).
      replace: Whether it replaces an existing checkpoint at ``name``.
    """

    storage: Storage
    name: str
    where: str
    path: str
    replace: bool


def begin(storage: Storage, name: str, where: str, *, replace: bool) -> Staging:
    """Prepares the final name for a new checkpoint and chooses where to write it.

    Raises:
      CheckpointExistsError: ``name`` holds a committed checkpoint and ``replace`` is false
        (another save created it since the caller checked), or holds files not keepax's.
      OSError: The storage failed.
    """
    try:
        begin_write(storage, name, replace=replace)
    except FileExistsError as e:
        raise CheckpointExistsError(_EXISTS, path=where) from e
    return Staging(storage, name, where, storage.staging_name(name), replace)


def commit(
    staging: Staging, manifest: Manifest, *, before_commit: Callable[[], None] | None = None
) -> int:
    """Writes the manifest and the commit marker, then makes the checkpoint visible.

    The marker records the manifest's format version, size and checksum. The caller's data
    files must already be durable under ``staging.path``.

    Args:
      staging: What :func:`begin` returned (or, on the processes that did not call it, the
        same staging as process 0 chose).
      manifest: The checkpoint's manifest.
      before_commit: Called once the manifest is written, before the commit marker; if it
        raises, nothing is committed.

    Returns:
      The bytes written (manifest and marker).

    Raises:
      CheckpointExistsError: Another save created the checkpoint first.
      OSError: The storage failed; nothing was committed. The caller discards the staging.
    """
    storage = staging.storage
    manifest_bytes = manifest.to_json()
    marker = CommitMarker(
        manifest.version, len(manifest_bytes), datafiles.checksum(manifest_bytes), time.time()
    )
    marker_bytes = marker.to_json()
    manifest_path, marker_path = f"{staging.path}/{MANIFEST_FILE}", f"{staging.path}/{COMMIT_FILE}"
    if not storage.atomic_rename:  # the marker commits: the manifest is durable before it
        storage.write_bytes(manifest_path, manifest_bytes)
        if before_commit is not None:
            before_commit()
        storage.write_bytes(marker_path, marker_bytes)
    else:  # the rename commits: both are made durable at once, before it
        manifest_writer = _written(storage, manifest_path, manifest_bytes)
        try:
            if before_commit is not None:
                before_commit()
            marker_writer = _written(storage, marker_path, marker_bytes)
        except BaseException:
            manifest_writer.abort()
            raise
        _close_together(manifest_writer, marker_writer)
    try:
        storage.commit(staging.path, staging.name, replace=staging.replace)
    except FileExistsError as e:
        raise CheckpointExistsError(_EXISTS, path=staging.where) from e
    return len(manifest_bytes) + len(marker_bytes)


def _written(storage: Storage, path: str, data: bytes) -> Writer:
    """A new file holding ``data``, written but not yet closed (nor durable)."""
    writer = storage.create(path)
    try:
        writer.write(memoryview(data))
    except BaseException:
        writer.abort()
        raise
    return writer


def _close_together(first: Writer, second: Writer) -> None:
    """Closes (makes durable) two writers at once: their syncs can share a journal commit.

    Raises:
      OSError: Either close failed (both are closed or aborted either way).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(first.close)
        try:
            second.close()
        finally:
            closing.result()


def discard(staging: Staging) -> None:
    """Removes an uncommitted staging directory, quietly (rename backends only: on marker
    backends the files sit at the final name, uncommitted, until the next save there or a
    manager start removes them)."""
    if not staging.storage.atomic_rename:
        return
    try:
        staging.storage.delete(staging.path)
    except OSError:
        pass  # A leftover staging directory is invisible to readers (its name is hidden).


@contextlib.contextmanager
def staged(storage: Storage, name: str, where: str, *, replace: bool) -> Iterator[Staging]:
    """:func:`begin`, then the caller's writes and :func:`commit`; :func:`discard` if any of
    them raises.

    Raises:
      As :func:`begin`, and whatever the body raises.
    """
    staging = begin(storage, name, where, replace=replace)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise


_UNFINISHED_ENTRIES = frozenset({MANIFEST_FILE, DATA_DIR})


def is_unfinished(storage: Storage, name: str) -> bool:
    """Whether ``name`` holds only what an interrupted marker save leaves (a manifest or data
    files, no commit marker); always false where saves are staged and renamed."""
    if storage.atomic_rename:
        return False
    entries = storage.list(name)
    return bool(entries) and COMMIT_FILE not in entries and set(entries) <= _UNFINISHED_ENTRIES


def begin_write(storage: Storage, name: str, *, replace: bool) -> None:
    """Prepares the final name ``name`` for a marker save: deletes an existing checkpoint's
    marker first, then its other files (with ``replace``), or an interrupted save's leftovers
    (and its unfinished uploads). Nothing to do where saves are staged and renamed.

    Raises:
      FileExistsError: ``name`` holds a committed checkpoint and ``replace`` is false, or
        holds files that are not keepax's.
    """
    if storage.atomic_rename:
        return
    entries = storage.list(name)
    if not entries:
        try:
            storage.abort_uploads(name)  # of an earlier save that died mid-file
        except OSError:
            pass  # optional clean-up: the parts stay invisible
        return
    if COMMIT_FILE in entries:
        if not replace:
            raise FileExistsError(errno.EEXIST, "a checkpoint exists", storage.display(name))
        # The marker first: from here on no reader takes the old files for a checkpoint.
        storage.delete(f"{name}/{COMMIT_FILE}")
    elif not replace and not is_unfinished(storage, name):
        raise FileExistsError(errno.EEXIST, "something else exists here", storage.display(name))
    storage.delete(name)
