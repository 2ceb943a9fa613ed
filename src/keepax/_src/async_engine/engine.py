"""The save engine: at most ``max_in_flight`` saves staged or being written, one writer
thread running them in order, and their failures kept until someone sees them.

A save is split in two. In the caller's thread: checks, the tree taken apart
(:func:`checkpoint.prepare_save`, which captures Python values), and *staging*
(:mod:`.staging`): every array the caller could change afterwards is copied, or held through
a view that donation and deletion cannot change (computed CPU ``jax.Array``s), so that the
caller may then donate, delete or mutate its buffers. On the engine's writer thread
(:class:`.job.Job`): the data files, the manifest and the commit
(:func:`checkpoint.write_prepared`), then the caller's ``on_commit`` (the manager's
bookkeeping and retention).

Host memory is bounded twice: at most ``max_in_flight`` saves are staged or being written
(the next save waits), and the bytes staged but not yet written stay within
``staging_budget_bytes`` (beyond it, staging streams: a save larger than the budget blocks
for roughly the time to write what exceeds it).

Errors: a failure on the writer thread is kept (never swallowed), logged, and raised with the
checkpoint's path and step by the handle's :meth:`SaveHandle.wait` and by the next save (the
manager: also by ``wait_until_finished``, ``check_for_errors`` and ``close``). Nothing is
committed by a failed save.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from keepax._src import checkpoint
from keepax._src.async_engine.job import Job
from keepax._src.async_engine.records import SaveHandle, SaveRecord
from keepax._src.async_engine.staging import Budget, no_gc, stage
from keepax.errors import KeepaxError

__all__ = ["SaveEngine", "SaveHandle", "SaveRecord", "all_engines", "check_limits", "wait_for"]

logger = logging.getLogger("keepax")


class SaveEngine:
    """Runs saves on one writer thread, in order, with at most ``max_in_flight`` staged or
    being written, and the staged bytes within a budget.

    A :class:`~keepax.CheckpointManager` has one; :func:`keepax.save_async` shares a
    module-wide one.
    """

    def __init__(self, name: str, key: str | None = None) -> None:
        self.name = name
        self.key = key  # what it writes to (a manager's directory), for wait_for()
        self.budget = Budget()
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        self._unobserved: list[SaveHandle] = []
        self.records: collections.deque[SaveRecord] = collections.deque(maxlen=1000)
        _ENGINES.add(self)

    @property
    def in_flight(self) -> int:
        """Saves staged or being written, not finished."""
        return self._in_flight

    def save(
        self,
        prepare: Callable[[], checkpoint.PreparedSave],
        *,
        step: int | None = None,
        path: str,
        max_in_flight: int = 1,
        staging_budget_bytes: int | None = None,
        background: bool = True,
        on_commit: Callable[[checkpoint.SaveResult], None] | None = None,
        on_error: Callable[[KeepaxError], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> SaveHandle:
        """Saves what ``prepare()`` (called once a slot is free) describes.

        With ``background`` false, writes in the caller's thread, with no staging copy, and
        raises any failure directly. Otherwise returns once staged.

        Args:
          check: Called after waiting for a slot (it raises the failures of the saves waited
            for, so that this save is not made after them).

        Raises:
          Whatever ``prepare`` or ``check`` raise, or a staging failure (nothing is written
          then).
        """
        began = time.perf_counter()
        waited = self._acquire_slot(max_in_flight, path, step)
        handle = SaveHandle(path, step)
        try:
            if check is not None:
                check()
            with no_gc():
                prepared = prepare()
        except BaseException:
            self._release_slot()
            raise
        handle.path = prepared.where
        job = Job(self, handle, prepared, on_commit, on_error, background)
        if not background:
            handle._staged = True
            job.run()
            record = SaveRecord(handle.path, step, time.perf_counter() - began, waited, 0.0, 0)
            handle._record = dataclasses.replace(record, **job.record_fields)
            self.log_record(handle._record)
            if job.raw_error is not None:
                raise job.raw_error
            return handle
        copied, budget_wait = self._stage(job, staging_budget_bytes)
        handle._staged = True
        blocked = time.perf_counter() - began
        record = SaveRecord(handle.path, step, blocked, waited, budget_wait, copied)
        with job.lock:
            finished = job.finished
            if finished:  # it finished before the record existed
                record = dataclasses.replace(record, **job.record_fields)
            handle._record = record
        if finished:
            self.log_record(record)
        # A write that failed already (even while this call was staging) is raised like any
        # other background failure: by handle.wait() and the next call.
        return handle

    def _stage(self, job: Job, limit: int | None) -> tuple[int, float]:
        """Queues ``job`` for the writer and stages its arrays while the writer starts on
        them; returns (bytes staged, seconds waited for the budget)."""
        with no_gc():
            try:
                job.stage_sources()
            except BaseException as e:
                job.aborted = e
                raise
            finally:
                # Queued even when staging failed: the writer then reports the failure (in a
                # multi-process save, to every process at once) and frees the slot.
                with self._cond:
                    self._queue.append(job)
                    self._start_writer()
            try:
                return stage(job, job.prepared.plan.buffers, self.budget, limit)
            except BaseException as e:
                job.aborted = e
                raise

    def _acquire_slot(self, max_in_flight: int, path: str, step: int | None) -> float:
        with self._cond:
            if self._in_flight < max_in_flight:
                self._in_flight += 1
                return 0.0
            began = time.perf_counter()
            what = f"step {step}" if step is not None else path
            while self._in_flight >= max_in_flight:
                self._cond.wait()
            self._in_flight += 1
        waited = time.perf_counter() - began
        logger.info("keepax: save of %s waited %.3fs: %d save(s) already in flight "
                    "(max_in_flight=%d)", what, waited, max_in_flight, max_in_flight)
        return waited

    def _release_slot(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def _start_writer(self) -> None:
        # Called with self._cond held.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._writer, name=f"keepax-writer-{self.name}", daemon=True
            )
            self._thread.start()

    def _writer(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None  # a later save starts a new thread
                    return
                job = self._queue.popleft()
            job.run()

    def on_writer_thread(self) -> bool:
        """Whether the calling thread is this engine's writer (which must never wait for
        itself)."""
        return threading.current_thread() is self._thread

    def job_done(self, job: Job) -> None:
        """Called by a job once it finished: keeps an unseen failure, frees its slot."""
        handle = job.handle
        if handle._error is not None and not handle._observed and job.on_error is None:
            with self._cond:
                self._unobserved.append(handle)
        handle._done.set()
        self._release_slot()

    def log_record(self, record: SaveRecord) -> None:
        """Keeps the record of a finished save (logging it if committed)."""
        if record.committed:
            logger.info("keepax: saved %s", record.describe())
        self.records.append(record)

    def wait(self) -> None:
        """Waits until no save is in flight (does not raise their errors)."""
        if self.on_writer_thread():
            raise RuntimeError("SaveEngine.wait() called from its own writer thread")
        with self._cond:
            while self._in_flight:
                self._cond.wait()

    def check_errors(self) -> None:
        """Raises the first failure no one has seen yet (once), noting any others."""
        with self._cond:
            failed = [h for h in self._unobserved if not h._observed]
            self._unobserved = []
        if not failed:
            return
        for handle in failed:
            handle._observed = True
        first = failed[0]._error
        assert first is not None
        if len(failed) > 1:
            first.add_note(f"{len(failed) - 1} more background save failure(s):")
            for other in failed[1:]:
                first.add_note(f"  {other._error}")
        raise first


_ENGINES: weakref.WeakSet[SaveEngine] = weakref.WeakSet()


def all_engines() -> list[SaveEngine]:
    """Every engine of this process still alive."""
    return list(_ENGINES)


def wait_for(key: str) -> None:
    """Waits for the saves in flight of every engine of this process writing to ``key`` (so
    that a reader of a directory sees what was saved into it before)."""
    for engine in all_engines():
        if engine.key == key and not engine.on_writer_thread():
            engine.wait()


def check_limits(max_in_flight: Any, staging_budget_bytes: Any) -> None:
    """Checks the in-flight and staging limits a caller gave.

    Raises:
      ValueError: ``max_in_flight`` is not an int >= 1, or ``staging_budget_bytes`` is
        neither None nor an int >= 0.
    """
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
    if staging_budget_bytes is not None and (
        isinstance(staging_budget_bytes, bool)
        or not isinstance(staging_budget_bytes, int)
        or staging_budget_bytes < 0
    ):
        raise ValueError(
            f"staging_budget_bytes must be None (no limit) or an int >= 0, got "
            f"{staging_budget_bytes!r}"
        )


_check_limits = check_limits  # the name the manager used before the split
