"""The storage interface every backend implements.

A :class:`Storage` is rooted at a directory (or bucket prefix). Paths given to it are relative,
``/``-separated, and never contain ``..``: keepax builds them itself, never from user keys.

Storage is plain storage: files, ranged reads, listing, deletion, and capabilities a commit
protocol builds on. It knows nothing of keepax's format (file names, markers, manifests):

- :attr:`Storage.atomic_rename`: whether :meth:`Storage.rename_dir` renames a directory
  atomically (local disk, memory). Where it is true, a commit protocol can write under a
  hidden staging name and rename into place; where it is false (object stores), a small
  object written last with :meth:`Storage.write_bytes` is visible whole or not at all, and
  :meth:`Storage.delete` of one file can be ordered before the deletion of its directory.
- :meth:`Storage.abort_uploads`: discards the invisible parts of uploads that a killed
  writer left (object stores; nothing elsewhere).

Names containing :data:`STAGING_TAG` are reserved for temporaries (staging and trash).
"""

from __future__ import annotations

import abc
import builtins
import errno
import uuid

from keepax.errors import KeepaxError

__all__ = ["Storage", "Writer", "Reader", "STAGING_TAG", "is_hidden_name", "with_path"]

STAGING_TAG = ".keepax-"
"""Names containing this tag are staging or trash directories: never checkpoints."""


def is_hidden_name(name: str) -> bool:
    """Whether a directory entry is keepax's own temporary (staging or trash) entry."""
    return STAGING_TAG in name


_ERRNOS = (
    (FileNotFoundError, errno.ENOENT), (FileExistsError, errno.EEXIST),
    (PermissionError, errno.EACCES), (NotADirectoryError, errno.ENOTDIR),
    (IsADirectoryError, errno.EISDIR), (TimeoutError, errno.ETIMEDOUT),
)


def with_path(error: OSError, doing: str, where: str) -> OSError:
    """``error`` again, naming the file it concerns and what was being done to it.

    The errno (hence the ``OSError`` subclass) is kept, so ``except`` clauses keep working;
    errors that already name a file are returned as they are.

    Args:
      error: An ``OSError`` from the operating system or a client library.
      doing: What failed, e.g. ``"writing"``.
      where: The file's display path (:meth:`Storage.display`).
    """
    if error.filename is not None or isinstance(error, KeepaxError):
        return error
    code = error.errno
    if code is None:
        code = next((c for cls, c in _ERRNOS if isinstance(error, cls)), errno.EIO)
    reason = error.strerror or str(error) or type(error).__name__
    wrapped = OSError(code, f"{doing} failed: {reason}", where)
    wrapped.__cause__ = error
    return wrapped


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
      atomic_rename: Whether :meth:`rename_dir` renames directories atomically (and so
        whether :meth:`commit` renames a staging directory into place).
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

    def uploads(self, path: str = "") -> builtins.list[tuple[str, float | None]]:
        """The unfinished uploads under a directory (those :meth:`abort_uploads` aborts):
        ``(name, started)``, the name relative to the storage's root and the start as Unix
        time (None: unknown). Backends without such uploads have none."""
        del path
        return []

    def abort_uploads(self, path: str = "", *, older_than: float = 0.0) -> int:
        """Aborts unfinished uploads under a directory that started at least ``older_than``
        seconds ago; returns how many.

        Object stores keep the parts of a multipart upload whose writer died (invisible, but
        stored and billed) until it is completed or aborted. Backends without such uploads
        have nothing to abort and return 0.

        Args:
          path: The directory (``""``: the whole storage).
          older_than: The grace period in seconds: younger uploads may still be in progress.
        """
        del path, older_than
        return 0

    # -- Commit protocol steps, kept as methods while other layers call them so. ---------------

    def staging_name(self, name: str) -> str:
        """Where a checkpoint called ``name`` is written before it is committed: a hidden
        sibling where renames are atomic, ``name`` itself elsewhere."""
        if not self.atomic_rename:
            return name
        return f"{name}{STAGING_TAG}tmp-{uuid.uuid4().hex[:12]}"

    def commit(self, staging: str, name: str, *, replace: bool) -> None:
        """Renames a fully written staging directory into place as ``name`` (nothing to do
        where :attr:`atomic_rename` is false: there the last small object written commits).

        Args:
          staging: What :meth:`staging_name` returned, complete.
          name: The final name.
          replace: Whether an existing ``name`` is to be replaced (atomically where possible).

        Raises:
          FileExistsError: ``name`` exists and ``replace`` is false.
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
