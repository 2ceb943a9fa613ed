"""One save on its way: chunk sources reading staged copies (slots), the write and commit
(:func:`checkpoint.write_prepared`), the caller's ``on_commit``, and how it finished."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from keepax._src import checkpoint
from keepax._src.async_engine.records import SaveHandle, SaveRecord, background_error
from keepax._src.async_engine.staging import Budget, Slot
from keepax._src.format.datafiles import ChunkSource
from keepax.errors import KeepaxError

__all__ = ["Job", "JobOwner"]

logger = logging.getLogger("keepax")


class JobOwner(Protocol):
    """What a :class:`Job` reports to (the ``SaveEngine`` running it)."""

    budget: Budget

    def log_record(self, record: SaveRecord) -> None:
        """Keeps (and logs) the record of a finished save."""
        ...

    def job_done(self, job: Job) -> None:
        """Called last, once the job finished (committed or failed)."""
        ...


class StagingFailed(Exception):
    """Staging failed in the caller's thread; the writer gives up (the caller has the error).

    In a multi-process save the writer still joins the save's collectives and reports this
    error (its text names the cause), so that every process fails at once."""


class Job:
    """One save on its way: staged copies (slots), chunk sources reading them, the write."""

    def __init__(
        self,
        engine: JobOwner,
        handle: SaveHandle,
        prepared: checkpoint.PreparedSave,
        on_commit: Callable[[checkpoint.SaveResult], None] | None,
        on_error: Callable[[KeepaxError], None] | None,
        background: bool,
    ) -> None:
        self.engine = engine
        self.handle = handle
        self.prepared = prepared
        self.on_commit = on_commit
        self.on_error = on_error
        self.background = background
        self.slots: list[Slot] = []
        self.sources: Sequence[ChunkSource] | None = None
        self.lock = threading.Lock()  # guards slots' counts, `closed`, `finished`, the record
        self.staged = threading.Condition()  # notified when slots become ready
        self.local = threading.local()
        self.aborted: BaseException | None = None  # set by the caller if staging fails
        self.closed = False  # staged copies dropped: no more budget may be held
        self.finished = False
        self.raw_error: BaseException | None = None
        self.record_fields: dict[str, Any] = {}

    # -- staged chunk sources -------------------------------------------------------------

    def stage_sources(self) -> None:
        """Chunk sources reading from staged copies (each waits until its copy is staged)."""
        plan = self.prepared.plan
        sources = list(plan.sources)
        for buffer in plan.buffers:
            slot = Slot(len(buffer.chunks), buffer.nbytes)
            self.slots.append(slot)
            for index, slices in buffer.chunks:
                s = sources[index]
                sources[index] = ChunkSource(s.leaf, s.name, s.start, s.shape, s.dtype,
                                             self._getter(slot, slices))
        self.sources = sources

    def set_ready(self, staged: Sequence[tuple[Slot, Any]]) -> None:
        """Makes staged copies available to the writer."""
        for slot, array in staged:
            slot.array = array
        with self.staged:
            for slot, _ in staged:
                slot.ready = True
            self.staged.notify_all()

    def _getter(self, slot: Slot, slices: tuple[slice, ...]) -> Callable[[], np.ndarray]:
        def get() -> np.ndarray:
            # The format writes each chunk before asking this thread for the next one: the
            # chunk fetched before is on storage now, so its copy may go.
            self._consumed(getattr(self.local, "last", None))
            self.local.last = None
            if not slot.ready:
                with self.staged:
                    while not slot.ready:
                        self._check_not_aborted()
                        self.staged.wait(0.1)
            self._check_not_aborted()
            self.local.last = slot
            batch = slot.batch
            if batch is not None:
                batch.wait()
            return checkpoint.chunk_view(slot.array, slices)

        return get

    def _check_not_aborted(self) -> None:
        if self.aborted is not None:
            cause = self.aborted
            raise StagingFailed(f"staging the state on this process failed "
                                f"({type(cause).__name__}: {cause})") from cause

    def _consumed(self, slot: Slot | None) -> None:
        if slot is None:
            return
        with self.lock:
            slot.remaining -= 1
            if slot.remaining > 0:
                return
            slot.array = None
            held, slot.held = slot.held, 0
        if held:
            self.engine.budget.release(held)

    def hold(self, slots: Sequence[Slot]) -> bool:
        """Records that ``slots`` hold their bytes of budget (acquired by the caller); False
        (and releases them) if the job's copies were already dropped."""
        with self.lock:
            if not self.closed:
                for slot in slots:
                    slot.held = slot.nbytes
                return True
        self.engine.budget.release(sum(slot.nbytes for slot in slots))
        return False

    def release_all(self) -> None:
        """Drops every staged copy and releases the budget they held."""
        held = 0
        with self.lock:
            self.closed = True
            for slot in self.slots:
                slot.array = None
                slot.batch = None
                slot.remaining = 0
                held += slot.held
                slot.held = 0
        if held:
            self.engine.budget.release(held)

    # -- writing (on the writer thread, or the caller's for a synchronous save) -------------

    def run(self) -> None:
        """Writes and commits the checkpoint, then runs ``on_commit``; keeps any failure."""
        began = time.perf_counter()
        committed = False
        error: BaseException | None = None
        sources = self.sources
        if sources is None and self.aborted is not None:
            sources = []  # never staged: nothing to write, only the failure to report
        try:
            result = checkpoint.write_prepared(
                self.prepared, sources, before_commit=self._check_not_aborted
            )
            committed = True
            self.record_fields["bytes_written"] = result.bytes_written
            if self.on_commit is not None:
                self.on_commit(result)
        except BaseException as e:  # noqa: BLE001 - kept, logged and raised later
            error = e
        finally:
            self.release_all()
        self._finish(time.perf_counter() - began, committed, error)

    def _finish(self, seconds: float, committed: bool, error: BaseException | None) -> None:
        handle = self.handle
        wrapped: BaseException | None = None
        later: KeepaxError | None = None  # a background failure, raised by a later call
        if error is not None:
            self.raw_error = error
            if self.aborted is not None:
                wrapped = self.aborted  # the caller got it from the save call
            elif self.background:
                wrapped = later = background_error(error, handle.path, handle.step, committed)
            else:
                wrapped = error
        fields = dict(self.record_fields, write_seconds=seconds, committed=committed,
                      error=None if wrapped is None else f"{type(wrapped).__name__}: {wrapped}")
        with self.lock:
            self.record_fields = fields
            handle._committed = committed
            handle._error = wrapped
            if wrapped is not None and (self.aborted is not None or not self.background):
                handle._observed = True  # raised to the caller directly
            if handle._record is not None:
                handle._record = dataclasses.replace(handle._record, **fields)
            self.finished = True
        if handle._record is not None:
            self.engine.log_record(handle._record)
        if later is not None:
            logger.error("keepax: background save of %s failed; it is raised by the next "
                         "call: %s: %s", handle._what(), type(error).__name__, error)
            if self.on_error is not None:
                self.on_error(later)
        self.engine.job_done(self)
