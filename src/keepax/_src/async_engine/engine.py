"""Asynchronous saves: staging, the background writer, handles, and error surfacing.

A save is split in two. In the caller's thread: checks, the tree taken apart
(:func:`checkpoint.prepare_save`, which captures Python values), and *staging*: every array the
caller could change afterwards is copied, so that the caller may then donate, delete or
mutate its buffers. On the engine's writer thread: the data files, the manifest and the
commit (:func:`checkpoint.write_prepared`), then the caller's ``on_commit`` (the manager's
bookkeeping and retention).

Staging, per array (see :func:`_stage`), copies only what the caller could change:

- NumPy arrays (mutable): copied now into private host memory, large ones by parallel
  threads.
- ``jax.Array`` on CPU: an on-device copy, ``jax.device_put(x, may_alias=False)``, batched
  for the whole tree, which returns once the copies are *enqueued*, without waiting for
  ``x`` to be computed. JAX's runtime orders each copy before anything enqueued later: a
  donation of ``x`` waits for the copy to have read ``x``, and ``x.delete()`` frees the
  memory only after pending reads (PJRT's buffer usage events). The copy is private to
  keepax, so nothing the caller does changes it. (Holding ``x`` itself is not enough:
  ``np.asarray(x)`` is a zero-copy view of memory that donation hands to the next
  computation.) Small arrays that are already computed are copied on the host instead (a
  few microseconds each, against ~60 us of dispatch per on-device copy). The writer lets a
  batch of copies finish before it reads any, so copying and writing do not compete.
  Measured on a 2-vCPU machine, 1 GiB in 196 arrays: the save blocks ~0.02 s, where a
  parallel host copy blocks ~0.13 s and ``np.copy`` of every leaf takes ~0.15-0.23 s; but a
  donating step dispatched right after finishes ~0.05 s later than after a host copy, as
  it waits for the on-device copies (the module constant ``_CPU_STAGING = "host"`` selects
  host copies instead).
- ``jax.Array`` on accelerators: copied to host memory (``copy_to_host_async`` on every
  shard first, so the transfers overlap), so the save blocks for about one device-to-host
  copy and uses no device memory.
- Arrays the plan made itself (NumPy scalars, bytes, byte-swapped copies): not copied again.
- Python values, metadata and iterator states: captured by :func:`checkpoint.prepare_save`
  and the manager at the call.

Host memory is bounded twice: at most ``max_in_flight`` saves are staged or being written
(the next save waits), and the bytes staged but not yet written stay within
``staging_budget_bytes``: beyond it, staging streams — the save blocks until the writer has
written enough earlier bytes (so a save larger than the budget blocks for roughly the time to
write what exceeds it). One array larger than the whole budget is staged alone.

Errors: a failure on the writer thread is kept (never swallowed), logged, and raised with the
checkpoint's path and step by the handle's :meth:`SaveHandle.wait` and by the next save (the
manager: also by ``wait_until_finished``, ``check_for_errors`` and ``close``). Nothing is
committed by a failed save. Pending saves are waited for at interpreter exit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see end)
import contextlib
import dataclasses
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src import checkpoint
from keepax._src.format.datafiles import ChunkSource
from keepax.errors import KeepaxError

__all__ = ["SaveHandle", "SaveRecord", "SaveEngine", "save_async"]

logger = logging.getLogger("keepax")

_CPU_STAGING = "device"
"""How CPU ``jax.Array``s are staged: ``"device"`` (an on-device copy, enqueued) or ``"host"``
(a parallel copy into host memory). A module constant so measurements and tests can compare
the two; see the module docstring."""

_COPY_BLOCK = 8 << 20  # host copies are split into tasks of about this many bytes
_SMALL = 256 << 10  # a computed CPU array this small is cheaper to copy on the host (~3 us)
# than on the device (~60 us per array of dispatch)


# ---------------------------------------------------------------------------------------------
# What a save did.


@dataclasses.dataclass(frozen=True)
class SaveRecord:
    """What one save did and how long it took (logged at INFO on the ``"keepax"`` logger).

    Attributes:
      path: The checkpoint's path or URL.
      step: The manager's step, or None for :func:`keepax.save_async`.
      blocking_seconds: How long the save call held the caller (waiting included).
      wait_seconds: Part of it spent waiting because ``max_in_flight`` saves were in flight.
      budget_wait_seconds: Part of it spent waiting for earlier staged bytes to be written
        (staging beyond ``staging_budget_bytes`` streams).
      staging_bytes: Bytes copied to stage the state (0 for a synchronous save).
      write_seconds: From the start of writing to the commit (None until finished).
      bytes_written: Bytes of data files, manifest and commit marker (None unless committed).
      committed: Whether the checkpoint was committed.
      error: Why it failed, if it did.
    """

    path: str
    step: int | None
    blocking_seconds: float
    wait_seconds: float
    budget_wait_seconds: float
    staging_bytes: int
    write_seconds: float | None = None
    bytes_written: int | None = None
    committed: bool = False
    error: str | None = None

    @property
    def throughput(self) -> float | None:
        """Bytes written per second of writing (None until committed)."""
        if not self.committed or not self.write_seconds or self.bytes_written is None:
            return None
        return self.bytes_written / self.write_seconds

    def describe(self) -> str:
        """One line, as logged."""
        what = f"step {self.step} ({self.path})" if self.step is not None else self.path
        text = (f"{what}: blocked {self.blocking_seconds:.3f}s (waited "
                f"{self.wait_seconds:.3f}s for saves in flight, {self.budget_wait_seconds:.3f}s "
                f"for the staging budget), staged {_size(self.staging_bytes)}")
        if self.committed:
            rate = self.throughput
            text += (f", wrote {_size(self.bytes_written or 0)} in {self.write_seconds:.3f}s"
                     + (f" ({_size(rate)}/s)" if rate else "") + ", committed")
        elif self.error is not None:
            text += f", FAILED: {self.error}"
        return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The handle.


class SaveHandle:
    """One save in progress: *staged* (the caller may reuse, donate or delete its buffers) and
    then *committed* (durable and visible).

    ``keepax.save_async`` returns it once the state is staged, so :attr:`staged` is always
    true for a handle you hold; :meth:`wait` blocks until committed.

    Attributes:
      path: The checkpoint's path or URL.
      step: The manager's step, or None.
    """

    def __init__(self, path: str, step: int | None) -> None:
        self.path = path
        self.step = step
        self._staged = False
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._observed = False
        self._committed = False
        self._record: SaveRecord | None = None

    @property
    def staged(self) -> bool:
        """Whether the state is staged: later changes to the caller's arrays cannot change
        what is written."""
        return self._staged

    @property
    def committed(self) -> bool:
        """Whether the checkpoint is committed (durable and visible)."""
        return self._committed

    def done(self) -> bool:
        """Whether the save finished (committed, or failed)."""
        return self._done.is_set()

    @property
    def record(self) -> SaveRecord | None:
        """What the save did so far (complete once :meth:`done`); None until staged."""
        return self._record

    def wait(self, timeout: float | None = None) -> SaveRecord:
        """Blocks until the save is committed; returns its record.

        Raises:
          TimeoutError: ``timeout`` seconds passed first (the save goes on).
          KeepaxError: The save failed in the background (naming the path and step; the
            original exception is the ``__cause__``). Nothing was committed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the save of {self._what()} did not finish within {timeout}s")
        if self._error is not None:
            self._observed = True
            raise self._error
        assert self._record is not None
        return self._record

    def exception(self) -> BaseException | None:
        """The failure of a finished save (marked as seen), or None."""
        if self._error is not None:
            self._observed = True
        return self._error

    def _what(self) -> str:
        return f"step {self.step} ({self.path})" if self.step is not None else self.path

    def __repr__(self) -> str:
        state = ("committed" if self._committed else "failed" if self._error is not None
                 else "staged" if self._staged else "staging")
        return f"SaveHandle({self._what()}: {state})"


def _background_error(e: BaseException, path: str, step: int | None, committed: bool
                      ) -> KeepaxError:
    """The error a failed background save raises later: the original type where it is a
    keepax error, always naming the path and step, with the original as ``__cause__``."""
    if committed:
        message = (f"the step was committed, but the manager could not record it "
                   f"({type(e).__name__}: {e}); reload() to see it")
    else:
        message = (f"saving failed in the background, so nothing was committed "
                   f"({type(e).__name__}: {e}); fix the cause and save again")
    cls = type(e) if isinstance(e, KeepaxError) else KeepaxError
    try:
        error = cls(message, path=path, step=step, leaf=getattr(e, "leaf", None))
    except TypeError:  # a subclass with another constructor
        error = KeepaxError(message, path=path, step=step)
    error.__cause__ = e
    return error


# ---------------------------------------------------------------------------------------------
# Host memory budget.


class _Budget:
    """Bytes staged and not yet written, shared by the saves of one engine."""

    def __init__(self) -> None:
        self._used = 0
        self.peak = 0  # the most bytes ever held at once
        self._cond = threading.Condition()

    def _take(self, n: int) -> None:
        self._used += n
        self.peak = max(self.peak, self._used)

    def add(self, n: int) -> None:
        """Takes ``n`` bytes whatever the limit (for a save without one)."""
        with self._cond:
            self._take(n)

    def try_acquire(self, n: int, limit: int | None) -> bool:
        with self._cond:
            if limit is None or self._used == 0 or self._used + n <= limit:
                self._take(n)
                return True
            return False

    def acquire(self, n: int, limit: int | None, stop: Callable[[], bool]) -> None:
        """Waits until ``n`` more bytes fit (or nothing else is staged), or ``stop()``."""
        with self._cond:
            while not (limit is None or self._used == 0 or self._used + n <= limit):
                if stop():
                    break
                self._cond.wait(0.1)
            self._take(n)

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


class _Batch:
    """On-device copies enqueued together. The writer lets them all finish before it reads
    any: copying and writing at once only slow each other down (and a donated next step
    waits for the copies)."""

    __slots__ = ("copies", "done")

    def __init__(self, copies: list[Any]) -> None:
        self.copies: list[Any] | None = copies
        self.done = False

    def wait(self) -> None:
        if not self.done:
            copies = self.copies
            if copies is not None:
                jax.block_until_ready(copies)
            self.copies, self.done = None, True


class _Slot:
    """One staged buffer: the copy the chunks are read from, and how many chunks are left."""

    __slots__ = ("array", "ready", "remaining", "nbytes", "held", "batch")

    def __init__(self, remaining: int, nbytes: int) -> None:
        self.array: Any = None
        self.ready = False  # set under the job's condition, once `array` is the staged copy
        self.remaining = remaining
        self.nbytes = nbytes
        self.held = 0  # budget bytes this slot holds
        self.batch: _Batch | None = None  # for an on-device copy


class _Aborted(Exception):
    """Staging failed in the caller's thread; the writer gives up (the caller has the error)."""


# ---------------------------------------------------------------------------------------------
# A save job.


class _Job:
    """One save on its way: staged copies (slots), chunk sources reading them, the write."""

    def __init__(
        self,
        engine: SaveEngine,
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
        self.slots: list[_Slot] = []
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
            slot = _Slot(len(buffer.chunks), buffer.nbytes)
            self.slots.append(slot)
            for index, slices in buffer.chunks:
                s = sources[index]
                sources[index] = ChunkSource(s.leaf, s.name, s.start, s.shape, s.dtype,
                                             self._getter(slot, slices))
        self.sources = sources

    def set_ready(self, staged: Sequence[tuple[_Slot, Any]]) -> None:
        """Makes staged copies available to the writer."""
        for slot, array in staged:
            slot.array = array
        with self.staged:
            for slot, _ in staged:
                slot.ready = True
            self.staged.notify_all()

    def _getter(self, slot: _Slot, slices: tuple[slice, ...]) -> Callable[[], np.ndarray]:
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
            raise _Aborted("staging failed in the caller; nothing is committed") from (
                self.aborted
            )

    def _consumed(self, slot: _Slot | None) -> None:
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

    def hold(self, slots: Sequence[_Slot]) -> bool:
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
        began = time.perf_counter()
        committed = False
        error: BaseException | None = None
        try:
            result = checkpoint.write_prepared(
                self.prepared, self.sources, before_commit=self._check_not_aborted
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
        if error is not None:
            self.raw_error = error
            if self.aborted is not None:
                wrapped = self.aborted  # the caller got it from the save call
            elif self.background:
                wrapped = _background_error(error, handle.path, handle.step, committed)
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
            self.engine._log(handle._record)
        if wrapped is not None and self.background and self.aborted is None:
            logger.error("keepax: background save of %s failed; it is raised by the next "
                         "call: %s: %s", handle._what(), type(error).__name__, error)
            if self.on_error is not None:
                self.on_error(wrapped)
        self.engine._job_done(self)


# ---------------------------------------------------------------------------------------------
# Staging.


def _platform(array: jax.Array) -> str:
    return next(iter(array.sharding.device_set)).platform


def _stage(job: _Job, limit: int | None) -> tuple[int, float]:
    """Copies what must be copied into the job's slots, in source order, within the budget;
    returns (bytes copied, seconds waited for the budget)."""
    budget = job.engine.budget
    plan = job.prepared.plan
    copied = 0
    waited = 0.0
    device: list[tuple[_Slot, jax.Array]] = []
    to_host: list[tuple[_Slot, jax.Array]] = []
    host: list[tuple[_Slot, np.ndarray]] = []

    def flush() -> None:
        staged: list[tuple[_Slot, Any]] = []
        if device:
            copies = jax.device_put([a for _, a in device], may_alias=False)
            batch = _Batch(list(copies))
            for (slot, _), copy in zip(device, copies):
                slot.batch = batch
                staged.append((slot, copy))
            device.clear()
        if to_host:
            for _, array in to_host:
                array.copy_to_host_async()
            staged.extend((slot, np.asarray(array)) for slot, array in to_host)
            to_host.clear()
        if host:
            copies = _host_copies([a for _, a in host])
            staged.extend((slot, copy) for (slot, _), copy in zip(host, copies))
            host.clear()
        job.set_ready(staged)

    def classify(slot: _Slot, buffer: checkpoint.SourceBuffer) -> int:
        array = buffer.array
        if buffer.owned:
            job.set_ready([(slot, array)])
            return 0
        if isinstance(array, jax.Array):
            if _platform(array) != "cpu":
                to_host.append((slot, array))
            elif _CPU_STAGING == "device" and (slot.nbytes > _SMALL or not array.is_ready()):
                device.append((slot, array))
            else:
                host.append((slot, np.asarray(array)))
        else:
            host.append((slot, array))
        return slot.nbytes

    if limit is None:
        # No budget to wait for: take it all at once, stage in one go.
        budget.add(sum(slot.nbytes for slot in job.slots))
        if job.hold(job.slots):
            for slot, buffer in zip(job.slots, plan.buffers):
                copied += classify(slot, buffer)
        flush()
        return copied, waited
    for slot, buffer in zip(job.slots, plan.buffers):
        if job.finished:
            break  # the writer failed; the caller gets its error
        n = slot.nbytes
        if not budget.try_acquire(n, limit):
            flush()
            t = time.perf_counter()
            budget.acquire(n, limit, lambda: job.finished)
            waited += time.perf_counter() - t
        if not job.hold([slot]):
            break  # the writer failed and dropped the copies; the caller gets its error
        copied += classify(slot, buffer)
    flush()
    return copied, waited


@contextlib.contextmanager
def _no_gc() -> Any:
    """Pauses Python's cyclic garbage collector: taking apart and staging a tree of
    thousands of arrays allocates enough objects to trigger full collections, which (with
    JAX's hundreds of thousands of objects alive) cost more than the work itself (10,000
    arrays: 0.7 s blocking with it, 0.3 s without). Nothing here makes reference cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_copy_pool: concurrent.futures.ThreadPoolExecutor | None = None
_copy_pool_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 2) * 2, thread_name_prefix="keepax-stage"
            )
        return _copy_pool


def _host_copies(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Private C-contiguous copies of host arrays, made by parallel threads (large copies are
    split into blocks, small ones grouped)."""
    outs: list[np.ndarray] = []
    tasks: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    task_bytes = 0
    total = 0
    for array in arrays:
        if array.nbytes < _COPY_BLOCK or not array.flags.c_contiguous:
            outs.append(np.array(array, order="C", copy=True))
            continue
        out = np.empty(array.shape, array.dtype)
        outs.append(out)
        src = array.reshape(-1).view(np.uint8)
        dst = out.reshape(-1).view(np.uint8)
        for start in range(0, len(src), _COPY_BLOCK):
            piece = (dst[start : start + _COPY_BLOCK], src[start : start + _COPY_BLOCK])
            tasks[-1].append(piece)
            task_bytes += len(piece[1])
            total += len(piece[1])
            if task_bytes >= _COPY_BLOCK:
                tasks.append([])
                task_bytes = 0

    def run(task: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for dst, src in task:
            np.copyto(dst, src)

    tasks = [t for t in tasks if t]
    if total < 2 * _COPY_BLOCK or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        list(_pool().map(run, tasks))
    return outs


# ---------------------------------------------------------------------------------------------
# The engine: in-flight limit, writer thread, errors.


class SaveEngine:
    """Runs saves on one writer thread, in order, with at most ``max_in_flight`` staged or
    being written, and the staged bytes within a budget.

    A :class:`~keepax.CheckpointManager` has one; :func:`save_async` shares a module-wide one.
    """

    def __init__(self, name: str, key: str | None = None) -> None:
        self.name = name
        self.key = key  # what it writes to (a manager's directory), for wait_for()
        self.budget = _Budget()
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
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
            with _no_gc():
                prepared = prepare()
        except BaseException:
            self._release_slot()
            raise
        handle.path = prepared.where
        job = _Job(self, handle, prepared, on_commit, on_error, background)
        if not background:
            handle._staged = True
            job.run()
            record = SaveRecord(handle.path, step, time.perf_counter() - began, waited, 0.0, 0)
            handle._record = dataclasses.replace(record, **job.record_fields)
            self._log(handle._record)
            if job.raw_error is not None:
                raise job.raw_error
            return handle
        with _no_gc():
            job.stage_sources()
            with self._cond:
                self._queue.append(job)
                self._start_writer()
            try:
                copied, budget_wait = _stage(job, staging_budget_bytes)
            except BaseException as e:
                job.aborted = e
                raise
        handle._staged = True
        blocked = time.perf_counter() - began
        record = SaveRecord(handle.path, step, blocked, waited, budget_wait, copied)
        with job.lock:
            finished = job.finished
            if finished:  # it finished before the record existed
                record = dataclasses.replace(record, **job.record_fields)
            handle._record = record
        if finished:
            self._log(record)
        # A write that failed already (even while this call was staging) is raised like any
        # other background failure: by handle.wait() and the next call.
        return handle

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

    def _job_done(self, job: _Job) -> None:
        handle = job.handle
        if handle._error is not None and not handle._observed and job.on_error is None:
            with self._cond:
                self._unobserved.append(handle)
        handle._done.set()
        self._release_slot()

    def _log(self, record: SaveRecord) -> None:
        if record.committed:
            logger.info("keepax: saved %s", record.describe())
        self.records.append(record)

    def wait(self) -> None:
        """Waits until no save is in flight (does not raise their errors)."""
        if threading.current_thread() is self._thread:
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


def wait_for(key: str) -> None:
    """Waits for the saves in flight of every engine of this process writing to ``key`` (so
    that a reader of a directory sees what was saved into it before)."""
    for engine in list(_ENGINES):
        if engine.key == key and threading.current_thread() is not engine._thread:
            engine.wait()

_default_engine: SaveEngine | None = None
_default_lock = threading.Lock()


def _check_limits(max_in_flight: Any, staging_budget_bytes: Any) -> None:
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


def save_async(
    path: str,
    tree: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_in_flight: int = 1,
    staging_budget_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SaveHandle:
    """Saves a pytree as :func:`keepax.save` does, returning once the state is staged.

    When it returns, the caller may donate (``jax.jit(..., donate_argnums=...)``), delete or
    mutate its arrays: what is written is the state at the call. Writing and the commit go on
    in the background; ``handle.wait()`` blocks until committed.

    Args:
      path: The checkpoint directory to create (local path or ``memory://store/name``).
      tree: Any pytree :func:`keepax.save` accepts.
      metadata: JSON-serialisable user metadata.
      overwrite: Replace an existing checkpoint at ``path`` (atomically).
      max_in_flight: At most this many ``save_async`` saves staged or being written; the call
        waits for earlier ones to finish first (the wait is logged and in the record).
      staging_budget_bytes: At most this many bytes staged and not yet written (None: no
        limit beyond ``max_in_flight`` copies of the state). Beyond it, staging streams: the
        call blocks until earlier bytes are written, trading blocking time for memory.
      storage_options: For URLs such as ``s3://bucket/ckpt``: as for :func:`keepax.save`.

    Returns:
      The save's :class:`SaveHandle`.

    Raises:
      KeepaxError: An earlier ``save_async`` failed in the background and its handle's
        ``wait()`` was never called (raised once; this save is not started).
      CheckpointExistsError, UnsupportedLeafError, KeepaxError: as :func:`keepax.save`, for
        what can be checked before writing.
    """
    _check_limits(max_in_flight, staging_budget_bytes)
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = SaveEngine("save_async")
        engine = _default_engine
    engine.check_errors()
    return engine.save(
        lambda: checkpoint.prepare_save(path, tree, metadata=metadata, overwrite=overwrite,
                                      storage_options=storage_options),
        path=str(path),
        max_in_flight=max_in_flight,
        staging_budget_bytes=staging_budget_bytes,
        check=engine.check_errors,
    )


def _wait_at_exit() -> None:
    """Interpreter exit waits for pending saves (failures are logged as they happen)."""
    for engine in list(_ENGINES):
        try:
            engine.wait()
        except Exception:  # noqa: BLE001 - never let one engine keep the others waiting
            logger.exception("keepax: waiting for pending saves at exit failed")


# Registered with threading's exit hooks (run before concurrent.futures stops accepting work,
# which the writer needs), else with atexit.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_wait_at_exit)
else:  # pragma: no cover - Python without threading._register_atexit
    import atexit

    atexit.register(_wait_at_exit)
