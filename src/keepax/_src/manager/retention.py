"""Deleting steps: what the keep policies say to delete, done safely and in the background.

Deletions are two-phase. A step is first *hidden*, atomically (renamed to a ``.keepax-trash-``
name, or its commit marker removed where storage cannot rename), at once; its files are then
removed on a background thread. Errors of background work are kept until the manager raises
them at its next call. When a manager starts, the leftovers of interrupted saves and deletions
(staging and trash directories, unfinished steps on object stores) are removed once old enough.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence

from keepax import policies
from keepax._src.checkpoint.incremental import ChunkStore
from keepax._src.commit import protocol
from keepax._src.format import spec
from keepax._src.format.manifest import COMMIT_FILE
from keepax._src.io import Storage, is_hidden_name
from keepax._src.io.lock import LOCK_NAME
from keepax._src.manager.index import StepIndex, StepInfo
from keepax._src.manager.run_metadata import RUN_METADATA_NAME
from keepax.errors import KeepaxError, KeepaxWarning

__all__ = ["Background", "Retention"]


class Background:
    """Runs deletions on one worker thread, in order, and keeps their errors (and those of
    background writes, reported here) until the manager raises them."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: list[concurrent.futures.Future[None]] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None], on_error: Callable[[BaseException], Exception]
               ) -> None:
        """Runs ``job`` on the worker; if it fails, keeps ``on_error(its exception)``."""
        def run() -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised by the manager
                error = on_error(e)
                error.__cause__ = e
                with self._lock:
                    self._errors.append(error)

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keepax-manager"
            )
        future = self._executor.submit(run)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [future]

    def report(self, error: BaseException) -> None:
        """Keeps an error for the manager to raise at its next call."""
        with self._lock:
            self._errors.append(error)

    def wait(self) -> None:
        """Waits for the jobs submitted so far."""
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)

    def raise_errors(self) -> None:
        """Raises the first error kept, if any, with the others in its notes (each once)."""
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        first = errors[0]
        if len(errors) > 1:
            first.add_note(f"{len(errors) - 1} more background failure(s):")
            for other in errors[1:]:
                first.add_note(f"  {other}")
        raise first

    def shutdown(self) -> None:
        """Stops the worker after its jobs."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Retention:
    """Deletes a directory's steps: after each commit as the keep policies say, or on request.

    Args:
      storage: The manager directory's storage.
      index: The step index (deleted steps leave it once hidden).
      background: Where file removals run and errors are kept.
      keep: The keep policies.
      leader: Whether this process touches the storage (in a multi-process run only process
        0 does, or with ``host_local`` each process in its own directory); the others only
        forget the steps.
    """

    def __init__(self, storage: Storage, index: StepIndex, background: Background,
                 keep: Sequence[policies.KeepPolicy], *, leader: bool) -> None:
        self._storage = storage
        self._index = index
        self._background = background
        self._keep = list(keep)
        self._leader = leader
        self._as_permanent: frozenset[str] = frozenset()
        self.store: ChunkStore | None = None
        """The chunk store whose references deleted steps release (None: no store)."""

    def keep_temporaries(self, records: Iterable[StepInfo]) -> None:
        """Treats these temporary steps (a previous run's) as permanent from now on: the
        keep policies decide about them, instead of their going once superseded."""
        self._as_permanent = frozenset(r.name for r in records if r.temporary)

    def plan(self) -> policies.RetentionPlan:
        """What the keep policies would delete now."""
        records = []
        for info in self._index.held().values():
            record = info.record()
            if record.temporary and info.name in self._as_permanent:
                record = dataclasses.replace(record, temporary=False)
            records.append(record)
        return policies.plan(records, self._keep)

    def after_commit(self, name: str, replaced: StepInfo | None) -> None:
        """Once a step called ``name`` is committed: deletes the step it replaced (under
        another name), then what the keep policies say."""
        if replaced is not None and replaced.name != name:
            self.discard([replaced])
        self.discard(self._index.records(self.plan().delete))

    def discard(self, records: Iterable[StepInfo], *, raise_now: bool = False) -> None:
        """Hides each step now, then removes its files in the background. A failure to hide
        is raised now (``raise_now``) or at the manager's next call; the step then stays
        held."""
        for record in records:
            if not self._leader:
                self._index.drop(record)
                if self.store is not None:  # forgets its chunks (process 0 deletes)
                    self.store.release(record.name)
                continue
            try:
                trash = self._hide(record.name)
            except Exception as e:  # noqa: BLE001 - surfaced below or at the next call
                error = KeepaxError(
                    f"deleting step {record.step} failed: {e}; it is still held",
                    path=record.path, step=record.step,
                )
                error.__cause__ = e
                if raise_now:
                    raise error from e
                self._background.report(error)
                continue
            self._index.drop(record)
            self._background.submit(
                functools.partial(self._remove, trash, record.name),
                functools.partial(self._removal_error, record=record, trash=trash),
            )

    def discard_newer(self, newer: Sequence[StepInfo], *, delete: bool) -> None:
        """Steps held here but not by every process (``host_local``): deleted with
        ``delete`` (``discard_newer``), else ignored with a warning."""
        if newer and delete:
            self.discard(newer, raise_now=True)
        elif newer:
            warnings.warn(
                f"{self._storage.display('')}: steps {[r.step for r in newer]} were committed "
                "here but not by every process; they are ignored (pass discard_newer=True to "
                "delete them)",
                KeepaxWarning, stacklevel=4,
            )

    def _remove(self, trash: str, name: str) -> None:
        """Removes a hidden step's files, then the chunk store files only it referred to."""
        if self.store is not None:
            self.store.delete(self.store.release(name))
        self._storage.delete(trash)

    def _removal_error(self, error: BaseException, record: StepInfo, trash: str) -> KeepaxError:
        return KeepaxError(
            f"removing the files of deleted step {record.step} failed in the background: "
            f"{error}. The step is gone from the manager; its files remain under "
            f"{self._storage.display(trash)} (removed when a manager next starts here, "
            "or delete them by hand)",
            path=record.path, step=record.step,
        )

    def _hide(self, name: str) -> str:
        """Makes a step invisible to readers, atomically; returns what is left to remove."""
        if self._storage.atomic_rename:
            trash = f"{name}.keepax-trash-{uuid.uuid4().hex[:12]}"
            self._storage.rename_dir(name, trash)
            return trash
        self._storage.delete(f"{name}/{COMMIT_FILE}")
        return name

    def remove_leftovers(self, grace: float) -> None:
        """Removes what interrupted saves and deletions left, once nothing in it has changed
        for ``grace`` seconds: staging and trash directories (``*.keepax-*``) and, on object
        stores (marker commits), step directories without a commit marker and multipart
        uploads that a killed save left unfinished under the directory (started ``grace``
        seconds ago or more). Storages that keep no modification times (in-memory) are left
        as they are. A failure to remove is a warning."""
        try:
            self._storage.abort_uploads("", older_than=grace)
        except OSError as e:
            warnings.warn(f"could not abort the unfinished uploads under "
                          f"{self._storage.display('')}: {e}", KeepaxWarning, stacklevel=5)
        now = time.time()
        marker = not self._storage.atomic_rename
        for name in self._storage.list(""):
            if name.startswith(LOCK_NAME) or name in (RUN_METADATA_NAME, spec.STORE_DIR):
                continue
            try:
                unfinished = marker and protocol.is_unfinished(self._storage, name)
                if not (is_hidden_name(name) or unfinished):
                    continue
                modified = self._storage.modified(name)
                if modified is None or now - modified < grace:
                    continue
                self._storage.delete(name)
            except OSError as e:
                warnings.warn(f"could not remove the leftover {self._storage.display(name)}: {e}",
                              KeepaxWarning, stacklevel=5)
