"""Local file system storage: positional I/O on file descriptors, fsync, atomic rename.

Reading is safe on a checkpoint from anyone:

- only regular files are opened: a FIFO, a device or a socket where a file should be is refused
  (checked before opening, opened non-blocking so that nothing can hang, checked again after);
- nothing outside the checkpoint is read: a path whose symbolic links resolve outside the
  top-level entry of the storage it lies in (the checkpoint directory, for the storages
  keepax opens for a checkpoint path) is refused, unless the storage was opened with
  ``follow_symlinks=True`` (storage option ``keepax_follow_symlinks``).
"""


from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Callable

from keepax._src.io.base import STAGING_TAG, Reader, Storage, Writer, with_path
from keepax.errors import CorruptCheckpointError

__all__ = ["LocalStorage"]

_IOV_MAX = 1024

# What staging directories' names hold (``Storage.staging_name``).
_STAGING = f"{STAGING_TAG}tmp-"

# renameat2(2) flags (Linux >= 3.15, glibc >= 2.28).
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():  # noqa: ANN202 - ctypes function or None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(source: str, target: str, flags: int) -> None:
    """Calls renameat2; raises NotImplementedError where the system lacks it or the flag."""
    if _renameat2 is None:
        raise NotImplementedError("renameat2 unavailable")
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise NotImplementedError(os.strerror(err))
        raise OSError(err, os.strerror(err), source, None, target)


class _LocalWriter(Writer):
    def __init__(self, path: str, where: str) -> None:
        self._path, self._where = path, where
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise with_path(e, "creating", where) from e

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        try:
            while len(data):
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as e:
            raise with_path(e, "writing", self._where) from e

    def writev(self, buffers: list[memoryview]) -> None:
        try:
            self._writev(buffers)
        except OSError as e:
            raise with_path(e, "writing", self._where) from e

    def _writev(self, buffers: list[memoryview]) -> None:
        pending = [b.cast("B") if b.ndim != 1 or b.format != "B" else b for b in buffers]
        pending = [b for b in pending if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            n = os.writev(self._fd, batch)
            # Drop what was fully written, keep the rest of a partly written buffer.
            done = 0
            while done < len(batch) and n >= len(batch[done]):
                n -= len(batch[done])
                done += 1
            pending = pending[done:]
            if n:
                pending[0] = pending[0][n:]

    def close(self) -> None:
        try:
            os.fsync(self._fd)  # (its name: by the fsync of its directory, sync_dir)
        except OSError as e:
            raise with_path(e, "syncing", self._where) from e
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


_Refuse = Callable[[str], CorruptCheckpointError]


class _LocalReader(Reader):
    def __init__(self, path: str, where: str, refuse: _Refuse) -> None:
        self._where = where
        # Never open what is not a regular file (opening a FIFO blocks until a writer comes,
        # opening a device may act on it); O_NONBLOCK and the fstat after close the window
        # in which it could be swapped between the two.
        try:
            if not stat.S_ISREG(mode := os.stat(path).st_mode):
                raise refuse(_KINDS.get(stat.S_IFMT(mode), "not a regular file"))
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise with_path(e, "opening", where) from e
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise refuse(_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file"))
        except BaseException:
            os.close(self._fd)
            raise
        self._size = info.st_size

    def read_into(self, offset: int, out: memoryview) -> int:
        try:
            return self._read_into(offset, out)
        except OSError as e:
            raise with_path(e, "reading", self._where) from e

    def _read_into(self, offset: int, out: memoryview) -> int:
        out = out.cast("B") if out.ndim != 1 or out.format != "B" else out
        total = 0
        while total < len(out):
            n = os.preadv(self._fd, [out[total:]], offset + total)
            if n == 0:
                break
            total += n
        return total

    def readv_into(self, offset: int, outs: list[memoryview]) -> int:
        try:
            return self._readv_into(offset, outs)
        except OSError as e:
            raise with_path(e, "reading", self._where) from e

    def _readv_into(self, offset: int, outs: list[memoryview]) -> int:
        pending = [o.cast("B") if o.ndim != 1 or o.format != "B" else o for o in outs]
        pending = [o for o in pending if len(o)]
        total = 0
        while pending:
            n = os.preadv(self._fd, pending[:_IOV_MAX], offset + total)
            if n == 0:
                break
            total += n
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if n:
                pending[0] = pending[0][n:]
        return total

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStorage(Storage):
    """Files under a local directory.

    Data files are written with ``write``/``writev`` and ``fsync``ed on close; commits rename a
    staging directory into place with ``renameat2`` (``RENAME_NOREPLACE``, or
    ``RENAME_EXCHANGE`` to replace atomically), then ``fsync`` the parent directory.

    Reads open regular files only, and only inside the top-level entry their path starts
    with (module docstring).

    Args:
      root: The directory.
      follow_symlinks: Whether to read files through symbolic links that lead outside their
        top-level entry (a checkpoint whose ``data`` directory links elsewhere, say). Off by
        default: a checkpoint from anyone must not make keepax read other files.
    """

    atomic_rename = True

    def __init__(self, root: str | os.PathLike[str], *, follow_symlinks: bool = False) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.url = os.fspath(root)
        self.follow_symlinks = follow_symlinks

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def create(self, path: str) -> Writer:
        full = self._abs(path)
        self._makedirs(os.path.dirname(full))
        return _LocalWriter(full, self.display(path))

    def _makedirs(self, directory: str) -> None:
        """Creates missing directories and fsyncs each new entry's parent (durable names).

        Except where the commit does it: a staging directory's own entry becomes durable
        with the fsync of its parent after the rename that commits it, and its
        subdirectories' entries with its fsync before that rename (:meth:`Storage.commit`);
        until the commit a lost staging directory is an uncommitted save.
        """
        if os.path.isdir(directory):
            return
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            parent = os.path.dirname(d)
            if not (_STAGING in os.path.basename(d) or _STAGING in os.path.basename(parent)):
                _fsync_dir(parent)

    def open(self, path: str) -> Reader:
        top = path.split("/", 1)[0]
        full = self._abs(path)
        if not self.follow_symlinks:
            full = self._inside(path, top)

        def refuse(kind: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(
                f"{path} is {kind}, not a regular file: keepax opens regular files only",
                path=self.display(top),
            )

        return _LocalReader(full, self.display(path), refuse)

    def _inside(self, path: str, top: str) -> str:
        """``path`` with its symbolic links resolved, if it stays inside ``top``."""
        base = os.path.realpath(self._abs(top))
        real = os.path.realpath(self._abs(path))
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return real
        raise CorruptCheckpointError(
            f"{path} is reached through a symbolic link and resolves to {real}, outside the "
            "checkpoint: keepax reads no file outside it. If you trust this checkpoint, pass "
            "storage_options={'keepax_follow_symlinks': True}",
            path=self.display(top),
        )

    def exists(self, path: str) -> bool:
        return os.path.exists(self._abs(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self._abs(path))

    def list(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._abs(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, path: str) -> None:
        full = self._abs(path)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)

    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        src, dst = self._abs(source), self._abs(target)
        if exchange:
            _rename2(src, dst, _RENAME_EXCHANGE)
            return
        try:
            _rename2(src, dst, _RENAME_NOREPLACE)
        except NotImplementedError:
            # Without renameat2 a concurrent creation of dst between check and rename can
            # still be replaced if it is an empty directory; a non-empty one makes rename fail.
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "target exists", dst) from None
            try:
                os.rename(src, dst)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "target exists", dst) from None
                raise
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "target exists", dst) from None
            raise

    def sync_dir(self, path: str) -> None:
        _fsync_dir(self._abs(path))

    def modified(self, path: str) -> float | None:
        try:
            return _newest_mtime(self._abs(path))
        except FileNotFoundError:
            return None


def _newest_mtime(path: str, depth: int = 2) -> float:
    """The newest modification time of ``path`` and the entries up to ``depth`` levels below
    (a checkpoint's files and its ``data/`` directory's)."""
    newest = os.lstat(path).st_mtime
    if depth and os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    newest = max(newest, _newest_mtime(entry.path, depth - 1))
                except FileNotFoundError:
                    continue  # removed meanwhile
    return newest


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
