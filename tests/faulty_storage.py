"""A storage-level fault injector for tests: hold or fail chosen storage operations.

:class:`Faults` says what goes wrong: file creations held until :meth:`Faults.release`, the
k-th matching creation failing, writes failing once a file has N bytes, directory renames
(the commit of rename backends) failing, openings for reading held. It acts on the
:class:`Storage` interface only (``create``, the returned :class:`Writer`, ``rename_dir``,
``open``), never on a backend's private classes.

Two ways to apply it:

- :class:`FaultyStorage` wraps a real storage object, where a test holds one (e.g. the
  ``storage`` of a :class:`checkpoint.PreparedSave` given to ``SaveEngine.save``).
- :meth:`Faults.install` for ``keepax.save``/``save_async``/``CheckpointManager``, which open
  their storage from a path themselves: keepax has no public way to pass a storage object
  (no ``storage=`` argument, no storage-option or URL-scheme hook in ``keepax._src.io``), so
  the interface methods of the backend classes are wrapped for the test's duration.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from keepax._src.io import Reader, Storage, Writer

__all__ = ["Faults", "FaultyStorage", "FaultyWriter", "disk_full"]


def disk_full() -> OSError:
    """The error a full disk raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@dataclasses.dataclass
class Faults:
    """What goes wrong, on the storage operations whose path ``matches``.

    Attributes:
      matches: Which paths the faults apply to (default: data files, ``.../data/...``).
      hold: Creations wait until :meth:`release` (at most ``hold_seconds``).
      fail_create: Raised by the ``fail_create_at``-th matching creation and every later one.
      fail_create_at: Which matching creation fails first (1: the first).
      fail_write_after: Writes fail with ``write_error`` once a file would exceed this many
        bytes (0: every write fails).
      write_error: Makes the error of a failing write (default: a full disk).
      fail_rename: Raised by every directory rename (a rename backend's commit).
      hold_reads: Opening a matching file for reading waits until :meth:`release` (at most
        ``hold_seconds``), as a stalled network mount or object store would.
      entered: Set when a matching creation is reached (held or not).
      creates: How many matching creations were reached.
    """

    matches: Callable[[str], bool] = lambda path: "/data/" in path
    hold: bool = False
    hold_seconds: float = 30.0
    fail_create: BaseException | None = None
    fail_create_at: int = 1
    fail_write_after: int | None = None
    write_error: Callable[[], BaseException] = disk_full
    fail_rename: BaseException | None = None
    hold_reads: bool = False
    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    creates: int = 0
    _released: threading.Event = dataclasses.field(default_factory=threading.Event)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def release(self) -> None:
        """Lets held creations (and later ones) go on."""
        self._released.set()

    def create(self, path: str, make: Callable[[], Writer]) -> Writer:
        """A creation of ``path`` by ``make()``, with the faults applied."""
        if not self.matches(path):
            return make()
        with self._lock:
            self.creates += 1
            count = self.creates
        self.entered.set()
        if self.hold and not self._released.wait(self.hold_seconds):
            raise AssertionError(f"the test never released the held creation of {path}")
        if self.fail_create is not None and count >= self.fail_create_at:
            raise self.fail_create
        writer = make()
        if self.fail_write_after is None:
            return writer
        return FaultyWriter(writer, self.fail_write_after, self.write_error)

    def open(self, path: str, make: Callable[[], Reader]) -> Reader:
        """An opening of ``path`` for reading by ``make()``, held if asked."""
        if self.hold_reads and self.matches(path):
            self.entered.set()
            self._released.wait(self.hold_seconds)
        return make()

    def rename(self, rename: Callable[[], None]) -> None:
        """A directory rename, failing if asked."""
        if self.fail_rename is not None:
            raise self.fail_rename
        rename()

    def install(self, monkeypatch: pytest.MonkeyPatch, *classes: type[Storage]) -> Faults:
        """Applies the faults to every storage of these backend classes until the test ends
        (``monkeypatch.undo()`` removes them sooner)."""
        for cls in classes:
            create, rename_dir, open_ = cls.create, cls.rename_dir, cls.open

            def faulty_create(storage: Storage, path: str, _create: Any = create) -> Writer:
                return self.create(path, lambda: _create(storage, path))

            def faulty_rename(storage: Storage, source: str, target: str, *,
                              exchange: bool = False, _rename: Any = rename_dir) -> None:
                self.rename(lambda: _rename(storage, source, target, exchange=exchange))

            def faulty_open(storage: Storage, path: str, _open: Any = open_) -> Reader:
                return self.open(path, lambda: _open(storage, path))

            monkeypatch.setattr(cls, "open", faulty_open)
            monkeypatch.setattr(cls, "create", faulty_create)
            monkeypatch.setattr(cls, "rename_dir", faulty_rename)
        return self


class FaultyWriter(Writer):
    """A real writer whose writes fail once the file would exceed ``limit`` bytes."""

    def __init__(self, inner: Writer, limit: int, error: Callable[[], BaseException]) -> None:
        self.inner = inner
        self.limit = limit
        self.error = error
        self.written = 0

    def _admit(self, n: int) -> None:
        if self.written + n > self.limit:
            raise self.error()
        self.written += n

    def write(self, data: memoryview) -> None:
        self._admit(len(data))
        self.inner.write(data)

    def writev(self, buffers: list[memoryview]) -> None:
        self._admit(sum(len(b) for b in buffers))
        self.inner.writev(buffers)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class FaultyStorage(Storage):
    """A real storage with :class:`Faults` applied to ``create`` and ``rename_dir``.

    The commit protocol's template methods (``staging_name``, ``commit``, ``write_bytes``)
    are the interface's own, so they reach the faults through this wrapper.
    """

    def __init__(self, inner: Storage, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self.url = inner.url
        self.atomic_rename = inner.atomic_rename

    def create(self, path: str) -> Writer:
        return self.faults.create(path, lambda: self.inner.create(path))

    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        self.faults.rename(lambda: self.inner.rename_dir(source, target, exchange=exchange))

    def open(self, path: str) -> Reader:
        return self.faults.open(path, lambda: self.inner.open(path))

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def is_dir(self, path: str) -> bool:
        return self.inner.is_dir(path)

    def list(self, path: str) -> list[str]:
        return self.inner.list(path)

    def delete(self, path: str) -> None:
        self.inner.delete(path)

    def sync_dir(self, path: str) -> None:
        self.inner.sync_dir(path)

    def modified(self, path: str) -> float | None:
        return self.inner.modified(path)
