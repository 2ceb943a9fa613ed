"""What an open :class:`~keepax.CheckpointManager` is made of, and how it is opened and closed.

:class:`Parts` opens the manager's directory (its storage, created if a missing local
directory), takes the directory lock (a writer: not ``read_only``, and process 0 of a
multi-process run unless ``host_local``), then, in this order:

1. waits for the saves this process still has in flight into the directory (a manager dropped
   unclosed);
2. a writer removes the leftovers of interrupted saves and deletions older than
   ``staging_grace`` (:meth:`.retention.Retention.remove_leftovers`: staging and trash
   directories, unfinished steps and multipart uploads on object stores);
3. a writer reads the steps (refusing a directory that holds Orbax checkpoints and no keepax
   steps: :mod:`.foreign`), then stores the run metadata; every process meets at a barrier, and
   the others read the steps after it (with ``host_local``, the steps every process holds);
4. where this process keeps a chunk store (incremental saves; in a multi-process run every
   process keeps one), counts the steps' references (process 0: every process's; the others:
   their own) and, a writer, removes store files no step refers to, older than
   ``staging_grace``;
5. builds the save decision and the write path, and installs the preemption handlers.

A failure at any point releases what was taken. :meth:`Parts.close` waits for the background
work and releases the lock and the signal handlers; so does garbage collection of an unclosed
manager.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from keepax._src.async_engine import engine as async_engine
from keepax._src.checkpoint.incremental import ChunkStore
from keepax._src.format.spec import STORE_DIR
from keepax._src.io import LocalStorage, Storage, open_root
from keepax._src.io.lock import DirectoryLock
from keepax._src.manager import foreign, run_metadata
from keepax._src.manager.decision import SaveDecider
from keepax._src.manager.index import StepIndex, StepInfo
from keepax._src.manager.options import Options
from keepax._src.manager.preemption import Preemption
from keepax._src.manager.processes import Processes
from keepax._src.manager.retention import Background, Retention
from keepax._src.manager.saving import Saver
from keepax.errors import CheckpointNotFoundError, KeepaxError, ManagerClosedError, PolicyError

__all__ = ["Parts"]


class Parts:
    """A manager's open directory and its components.

    Args:
      owner: The manager (when it is garbage-collected unclosed, the lock is released).
      directory: The manager's directory, as given.
      options: The manager's validated options.

    Raises:
      PolicyError: The directory is not a path or URL keepax stores to.
      DirectoryLockedError: Another manager holds the directory.
      CheckpointNotFoundError: ``read_only`` and the local directory does not exist.
      KeepaxError: The directory holds Orbax checkpoints and no keepax steps, or
        ``incremental=True`` with ``host_local=True`` in a multi-process run.
    """

    def __init__(self, owner: object, directory: str, options: Options) -> None:
        self.options = options
        self.storage = _open_storage(directory, options)
        self.where = self.storage.display("")
        self.processes = Processes(host_local=options.host_local, timeout=options.sync_timeout,
                                   where=self.where)
        if options.incremental and options.host_local and self.processes.multi and (
                not options.read_only):
            raise KeepaxError(
                "incremental=True does not work with host_local=True: each host would need "
                "its own chunk store and a step some hosts lack would keep store data alive; "
                "pass incremental=False, or save into a shared directory (host_local=False)",
                path=self.where)
        self._key = _storage_key(self.storage, self.where)
        self.index = StepIndex(self.storage, options.storage_options)
        self.engine = async_engine.SaveEngine(
            os.path.basename(directory.rstrip("/")) or "root", key=self._key
        )
        self.background = Background()
        self.retention = Retention(self.storage, self.index, self.background, options.keep,
                                   leader=self.processes.leader)
        self.preemption = Preemption()
        self.closed = False
        self.store: ChunkStore | None = None
        self._tracked: set[str] = set()
        lock = DirectoryLock(self.storage)
        writer = not options.read_only and self.processes.leader
        if writer:
            lock.acquire()
        self._release = weakref.finalize(owner, _release, lock, self.preemption)
        try:
            self._start(writer)
            self.decider = SaveDecider(options, self.index, self.preemption, self.processes)
            self.saver = Saver(options, self.storage, self.index, self.decider, self.preemption,
                               self.engine, self.background, self.retention)
            self.saver.store = self.store if options.incremental else None
            if options.preemption:
                self.preemption.install()
        except BaseException:
            self._release()
            raise

    def _start(self, writer: bool) -> None:
        """Steps 1 to 4 of the module docs."""
        options = self.options
        async_engine.wait_for(self._key)
        found = None
        if writer:
            self.retention.remove_leftovers(options.staging_grace)
            found = self.index.scan(refuse=self._refuse_foreign)
            if options.metadata is not None:
                run_metadata.store(self.storage, options.metadata)
        self.processes.barrier("manager.open")
        multi = self.processes.multi
        if not options.read_only and not (multi and options.host_local) and (
                options.incremental or (writer and self.storage.exists(STORE_DIR))):
            # The chunk store's bookkeeping: where this process saves incrementally (in a
            # multi-process run every process refers to stored copies of what it writes),
            # or deletes steps of a directory with a store (whose references retention must
            # then respect; in a multi-process run process 0 counts every process's).
            process = self.processes.index if multi else None
            self.store = self.retention.store = ChunkStore(self.storage, process=process,
                                                           leader=writer)
        self.scan(found if found is not None else self.index.scan(refuse=self._refuse_foreign))
        if self.store is not None and writer:
            self.store.collect(options.staging_grace)
        if options.keep_previous_temporary:
            self.retention.keep_temporaries(self.index.held().values())

    def _refuse_foreign(self) -> None:
        if foreign.looks_like_orbax_dir(self.storage):
            raise foreign.orbax_directory_error(self.where)

    def scan(self, found: dict[int, StepInfo] | None = None) -> None:
        """Reads the directory's steps (``found``: as just read by this process) into the
        index: after the saves this process has in flight into it (by this manager or
        another), the steps every process holds."""
        async_engine.wait_for(self._key)
        if found is None:
            found = self.index.scan()
        found, newer = self.processes.committed_everywhere(found)
        self.retention.discard_newer(newer, delete=self.options.discard_newer
                                     and not self.options.read_only)
        self.index.reset(found)
        if self.store is not None:
            for name in sorted({r.name for r in found.values()} - self._tracked):
                self.store.track(name)
                self._tracked.add(name)

    # -- state checks and lifetime -------------------------------------------------------------

    def check_open(self) -> None:
        """Raises ManagerClosedError once the manager is closed."""
        if self.closed:
            raise ManagerClosedError("this CheckpointManager is closed; build a new one",
                                     path=self.where)

    def check_writable(self, what: str) -> None:
        """Raises unless the manager is open and writable (``what`` names the call)."""
        self.check_open()
        if self.options.read_only:
            raise KeepaxError(f"{what} needs a writable manager; this one was opened with "
                              "read_only=True", path=self.where)

    def discard_after(self, step: int) -> None:
        """Deletes the steps after ``step`` (``restore(discard_newer=True)``)."""
        newer = [r for s, r in sorted(self.index.held().items()) if s > step]
        self.retention.discard(newer, raise_now=True)

    def close(self, in_flight: BaseException | None = None) -> None:
        """Waits for saves in flight and background deletions, releases the lock and the
        signal handlers, then raises any background error. Idempotent.

        Args:
          in_flight: An exception being raised (leaving a ``with`` block): a failure to
            close is then noted on it instead of raised.
        """
        if in_flight is not None:
            try:
                self.close()
            except Exception as error:  # noqa: BLE001 - attached to the exception in flight
                in_flight.add_note(f"and closing the CheckpointManager failed too: {error!r}")
            return
        if self.closed:
            return
        self.closed = True
        try:
            self.engine.wait()
            self.background.wait()
            self.background.shutdown()
        finally:
            self._release()
        self.background.raise_errors()


def _open_storage(directory: str, options: Options) -> Storage:
    """The manager directory's storage; a local directory is created if missing."""
    try:
        storage = open_root(directory, options.storage_options)
    except ValueError as e:
        raise PolicyError(str(e)) from None
    if isinstance(storage, LocalStorage) and not storage.is_dir(""):
        if options.read_only:
            raise CheckpointNotFoundError("the manager directory does not exist",
                                          path=storage.display(""))
        # Storage has no "make directory" (object stores and memory need none); a local
        # manager directory is made here, so that its lock file can be created in it.
        os.makedirs(storage.root, exist_ok=True)
    return storage


def _storage_key(storage: Storage, where: str) -> str:
    """What the async engine knows the directory by (its real path, for a local one)."""
    root: Any = getattr(storage, "root", None)
    return os.path.realpath(root) if isinstance(root, str) else where


def _release(lock: DirectoryLock, preemption: Preemption) -> None:
    """Releases what a manager holds (also when it is garbage-collected unclosed)."""
    try:
        preemption.uninstall()
    finally:
        lock.release()
