"""The storage interface every backend implements, and the commit protocol's two flavours.

A :class:`Storage` is rooted at a directory (or bucket prefix). Paths given to it are relative,
``/``-separated, and never contain ``..``: keepax builds them itself, never from user keys.

Commit protocols (``docs/FORMAT.md`` §Commit):

- *rename* (local disk, memory): a checkpoint is written under a hidden staging name beside its
  final name and renamed into place once complete.
- *marker* (object stores): a checkpoint is written in place; its commit marker, written
  last, alone makes it visible. Before anything of an existing checkpoint is modified or
  deleted, its marker is deleted (:meth:`Storage.begin_write`, :meth:`Storage.delete`).

In both, the last file written inside a checkpoint is its commit marker; readers ignore any
checkpoint directory without one and any name containing ``.keepax-``.
"""

from __future__ import annotations

import abc
import uuid

__all__ = ["Storage", "Writer", "Reader", "STAGING_TAG", "COMMIT_NAME", "is_hidden_name"]

STAGING_TAG = ".keepax-"
"""Names containing this tag are staging or trash directories: never checkpoints."""

COMMIT_NAME = "keepax.commit"
"""The commit marker's file name (``docs/FORMAT.md`` §4); marker backends delete it first."""


def is_hidden_name(name: str) -> bool:
    """Whether a directory entry is keepax's own temporary (staging or trash) entry."""
    return STAGING_TAG in name


class Writer(abc.ABC):
    """A file being written sequentially. ``close`` makes it durable; ``abort`` discards it."""

    @abc.abstractmethod
    def write(self, data: memoryview) -> None:
        """Appends bytes."""

    def writev(self, buffers: list[memoryview]) -> None:
        """Appends several buffers, in order (backends may do it in one system call)."""
        for buffer in buffers:
            self.write(buffer)

    @abc.abstractmethod
    def close(self) -> None:
        """Finishes the file durably (flushed and synced where the backend can)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Abandons the file; what was written may remain but is never committed."""


class Reader(abc.ABC):
    """A file opened for ranged reads. Safe to use from several threads at once."""

    @abc.abstractmethod
    def read_into(self, offset: int, out: memoryview) -> int:
        """Reads ``len(out)`` bytes at ``offset`` into ``out``; returns how many were read.

        Fewer bytes are returned only at the end of the file.
        """

    def readv_into(self, offset: int, outs: list[memoryview]) -> int:
        """Reads consecutive bytes at ``offset`` into several buffers in order (one request
        where the backend can); returns how many bytes were read in all."""
        total = 0
        for out in outs:
            n = self.read_into(offset + total, out)
            total += n
            if n < len(out):
                break
        return total

    @abc.abstractmethod
    def size(self) -> int:
        """The file's size in bytes."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the file."""


class Storage(abc.ABC):
    """A directory-like store of files addressed by relative paths.

    Attributes:
      url: The root, as the user wrote it (used in error messages).
      atomic_rename: Whether :meth:`commit` renames a staging directory into place.
    """

    url: str
    atomic_rename: bool = True

    def display(self, path: str) -> str:
        """Returns a path under the root as a user-facing string."""
        return f"{self.url.rstrip('/')}/{path}" if path else self.url

    @abc.abstractmethod
    def create(self, path: str) -> Writer:
        """Creates a new file (its parent directories as needed) and returns its writer."""

    @abc.abstractmethod
    def open(self, path: str) -> Reader:
        """Opens a file for reading. Raises ``FileNotFoundError`` if it does not exist."""

    def read_bytes(self, path: str) -> bytes:
        """Reads a whole (small) file."""
        reader = self.open(path)
        try:
            out = bytearray(reader.size())
            n = reader.read_into(0, memoryview(out))
            return bytes(out[:n])
        finally:
            reader.close()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Writes a whole (small) file durably."""
        writer = self.create(path)
        try:
            writer.write(memoryview(data))
        except BaseException:
            writer.abort()
            raise
        writer.close()

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory exists at ``path``."""

    @abc.abstractmethod
    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory (a prefix holding files, for object stores)."""

    @abc.abstractmethod
    def list(self, path: str) -> list[str]:
        """Names directly under a directory (files and subdirectories), sorted."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Deletes a file or a whole directory tree; missing paths are ignored."""

    @abc.abstractmethod
    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        """Renames a directory.

        Without ``exchange``, raises ``FileExistsError`` if ``target`` exists (never replaces
        it). With ``exchange``, atomically swaps ``source`` and ``target``, or raises
        ``NotImplementedError`` where the backend cannot. Only called when
        :attr:`atomic_rename` is true.
        """

    def sync_dir(self, path: str) -> None:  # noqa: B027 - optional hook
        """Makes the entries of a directory durable (local disks fsync it)."""

    def modified(self, path: str) -> float | None:
        """The newest modification time (Unix seconds) of ``path`` and what lies under it, or
        None where the backend keeps no times or nothing is there."""
        return None

    def is_unfinished(self, name: str) -> bool:
        """Whether ``name`` holds only what an interrupted save leaves (a manifest or data
        files, no commit marker). Only marker backends leave such directories at a final
        name; rename backends leave hidden staging directories instead."""
        return False

    def begin_write(self, name: str, *, replace: bool) -> None:  # noqa: B027 - optional hook
        """Prepares the final name ``name`` for a checkpoint about to be written.

        Rename backends write elsewhere first and need nothing here. Marker backends write in
        place, so they delete an existing checkpoint's commit marker first, then its other
        files (with ``replace``), or the leftovers of an interrupted save.

        Raises:
          FileExistsError: ``name`` holds a committed checkpoint and ``replace`` is false, or
            holds files that are not keepax's.
        """

    def staging_name(self, name: str) -> str:
        """Where a checkpoint called ``name`` is written before it is committed."""
        if not self.atomic_rename:
            return name
        return f"{name}{STAGING_TAG}tmp-{uuid.uuid4().hex[:12]}"

    def commit(self, staging: str, name: str, *, replace: bool) -> None:
        """Makes a fully written staging directory visible as ``name``.

        Args:
          staging: What :meth:`staging_name` returned, with the commit marker already inside.
          name: The final name.
          replace: Whether an existing ``name`` is to be replaced (atomically where possible).
        """
        if not self.atomic_rename:
            return
        self.sync_dir(staging)
        parent = name.rpartition("/")[0]
        if replace and self.exists(name):
            try:
                # The old checkpoint ends up under the staging name, hidden, then deleted.
                self.rename_dir(staging, name, exchange=True)
            except FileNotFoundError:
                # The old one vanished meanwhile: nothing to replace.
                self.rename_dir(staging, name)
                self.sync_dir(parent)
                return
            except NotImplementedError:
                # No atomic exchange here: for a moment no checkpoint is at ``name``; the old
                # one stays complete under a hidden trash name until the new one is in place.
                trash = f"{name}{STAGING_TAG}old-{uuid.uuid4().hex[:12]}"
                self.rename_dir(name, trash)
                self.rename_dir(staging, name)
                staging = trash
            self.sync_dir(parent)
            self.delete(staging)
        else:
            self.rename_dir(staging, name)
            self.sync_dir(parent)
