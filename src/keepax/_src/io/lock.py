"""One writer per manager directory: a lock file that names its holder.

On a local disk the lock is the file ``.keepax-lock`` in the directory, holding JSON
``{"host", "pid", "time", "token"}``. It appears atomically, complete (written to a temporary
file, then hard-linked into place, which fails if the lock exists), so a reader never sees a
half-written holder. A lock whose holder ran on this host and whose process is gone is stale
and taken over with a warning; any other held lock is refused with an error naming the holder.

Other storages (``memory://``, which lives in this process only) use an in-process registry.
Object stores, which have no atomic create-if-absent, will need their own scheme.

Reading and removing the lock file go through the :class:`~keepax._src.io.Storage`
interface. Creating it does not: :class:`Storage` has no atomic create-if-absent, so the lock
file is made with the operating system's ``link`` (or ``O_EXCL`` create) on the local
directory, the one storage where a lock file is used.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings

from keepax._src.io import LocalStorage, Storage
from keepax.errors import DirectoryLockedError, KeepaxWarning

__all__ = ["LOCK_NAME", "Holder", "DirectoryLock"]

LOCK_NAME = ".keepax-lock"
"""The lock file's name: hidden from step discovery by its ``.keepax-`` tag."""

_REGISTRY_LOCK = threading.Lock()
_HELD: dict[str, Holder] = {}
"""Locks held by this process, by directory: in-process locks, and the tokens of lock files."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: host name, process ID, Unix time taken, and a unique token."""

    host: str
    pid: int
    time: float
    token: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.time))
        return f"host {self.host}, PID {self.pid} (since {when})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OSError:
        return True
    return True


class DirectoryLock:
    """The write lock of one manager directory.

    Args:
      storage: The directory's storage.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._where = storage.display("")
        self._file = (
            os.path.join(storage.root, LOCK_NAME) if isinstance(storage, LocalStorage) else None
        )
        self._key = self._file or f"registry:{self._where}"
        self._mine: Holder | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._mine is not None

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
          DirectoryLockedError: Another manager holds it; the message names its host and PID.
        """
        if self._mine is not None:
            return
        me = Holder.me()
        with _REGISTRY_LOCK:
            if self._file is None:
                holder = _HELD.get(self._key)
                if holder is not None:
                    raise self._refusal(holder)
            else:
                self._acquire_file(me)
            _HELD[self._key] = me
        self._mine = me

    def release(self) -> None:
        """Releases the lock if held (only the lock file this object wrote is removed)."""
        mine, self._mine = self._mine, None
        if mine is None:
            return
        with _REGISTRY_LOCK:
            if _HELD.get(self._key) == mine:
                del _HELD[self._key]
            if self._file is not None and _read_holder(self._storage) == mine:
                self._storage.delete(LOCK_NAME)

    def _acquire_file(self, me: Holder) -> None:
        path = self._file or ""
        for _ in range(3):
            if _link_new(path, me):
                return
            holder = _read_holder(self._storage)
            if holder is None and not self._storage.exists(LOCK_NAME):
                continue  # released meanwhile
            if holder is None or not self._stale(holder):
                raise self._refusal(holder)
            warnings.warn(
                f"taking over the stale lock of {self._where}: its holder ({holder.describe()}) "
                "ran on this host and has exited without releasing it",
                KeepaxWarning,
                stacklevel=4,
            )
            if _read_holder(self._storage) == holder:
                self._storage.delete(LOCK_NAME)
        raise self._refusal(_read_holder(self._storage))

    def _stale(self, holder: Holder) -> bool:
        if holder.host != socket.gethostname():
            return False  # cannot tell whether a process on another host is alive
        if holder.pid == os.getpid():
            # This process: stale unless a live manager here holds it.
            return _HELD.get(self._key) != holder
        return not _pid_alive(holder.pid)

    def _refusal(self, holder: Holder | None) -> DirectoryLockedError:
        if holder is None:
            who = f"an unknown holder (the lock file {self._file} is unreadable)"
        else:
            who = holder.describe()
            if holder.pid == os.getpid() and holder.host == socket.gethostname():
                who += ", another CheckpointManager in this process"
        remedy = (
            f"; if that process is gone (e.g. on another host), delete {self._file}"
            if self._file is not None
            else ""
        )
        return DirectoryLockedError(
            f"this directory is in use by a CheckpointManager on {who}: two managers writing "
            "into one directory would interleave their steps and retention. close() the other "
            f"manager, or pass read_only=True to only read{remedy}.",
            path=self._where,
        )


def _link_new(path: str, holder: Holder) -> bool:
    """Creates the lock file with ``holder`` in it, atomically; False if it already exists.

    Written with ``os`` calls on the local directory: the storage interface has no atomic
    create-if-absent (a hard link of a complete temporary file, or an ``O_EXCL`` create).
    """
    data = json.dumps(dataclasses.asdict(holder)).encode()
    temp = f"{path}.{holder.token}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links here: fall back to an exclusive create.
        return _create_new(path, data)
    finally:
        os.unlink(temp)


def _create_new(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read_holder(storage: Storage) -> Holder | None:
    """The holder named by the lock file, or None if it is missing or unreadable."""
    try:
        reader = storage.open(LOCK_NAME)
        try:
            buffer = bytearray(4096)
            n = reader.read_into(0, memoryview(buffer))
        finally:
            reader.close()
        doc = json.loads(bytes(buffer[:n]))
        return Holder(str(doc["host"]), int(doc["pid"]), float(doc["time"]), str(doc["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
