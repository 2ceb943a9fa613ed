"""Staging: private copies of what the caller could change, within a host-memory budget.

Staging, per array (see :func:`stage`), copies only what the caller could change:

- NumPy arrays (mutable): copied now into private host memory, large ones by parallel
  threads.
- ``jax.Array`` on CPU, already computed: not copied. The writer reads it through a NumPy
  view taken now (``np.asarray(x)``, zero-copy), which is an *external reference* to ``x``'s
  buffer: while keepax holds it, XLA's CPU runtime donates ``x`` by copying it (the donating
  computation gets a fresh buffer and the view keeps its bytes) and ``x.delete()`` frees
  nothing until the view is dropped. ``jax.Array``s are immutable, so nothing the caller
  does changes what is written. Measured on a 2-vCPU machine, 1 GiB in 196 arrays: the
  background commit then takes 0.92-0.95 x a synchronous save, where a staging copy made
  it 1.4-4.9 x (page faults of 1 GiB of fresh memory and the copy's CPU time, on 1 core as
  on 2; BENCHMARKS.md, *Asynchronous saves*). A donating step that runs while the save holds
  its arrays pays one copy of what it donates (what staging would have copied anyway).
- ``jax.Array`` on CPU still being computed: a copy into the ``pinned_host`` memory kind
  (which CPU JAX offers; else an on-device copy), ``jax.device_put(x, ..., may_alias=False)``,
  batched for the whole tree, which returns once the copies are *enqueued*, without waiting
  for ``x`` to be computed (a view would wait). Measured as above, 1 GiB: the commit takes
  1.8-2.0 x a synchronous save with pinned host copies, 3.8-4.9 x with on-device copies,
  whose CPU time is 2-3 x as large. JAX's runtime orders each copy before anything
  enqueued later: a donation of ``x`` waits for the copy to have read ``x``, and
  ``x.delete()`` frees the memory only after pending reads (PJRT's buffer usage events).
  The writer lets a batch of copies finish before it reads any, so copying and writing do
  not compete. (The module constant ``_CPU_STAGING`` selects ``"device"``, ``"host"`` or
  ``"pinned_host"`` copies of every CPU array instead, for measurements.)
- ``jax.Array`` on accelerators: copied to host memory. Where the device offers a
  ``pinned_host`` memory kind (``device.addressable_memories()``), the copies are one
  batched ``jax.device_put`` into page-locked host memory, enqueued like the on-device
  copies above (the save blocks only while they are dispatched; the writer waits for
  them); otherwise ``copy_to_host_async`` on every shard first (so the transfers overlap),
  then ``np.asarray``, so the save blocks for about one device-to-host copy. Neither uses
  device memory. (``_ACCELERATOR_STAGING = "host"`` selects the second way everywhere.)
- Arrays the plan made itself (NumPy scalars, bytes, byte-swapped copies): not copied again.

The bytes staged but not yet written stay within ``staging_budget_bytes`` (a
:class:`Budget` per engine): beyond it, staging streams — the save blocks until the writer
has written enough earlier bytes. One array larger than the whole budget is staged alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from keepax._src import checkpoint
from keepax._src.util import gc_paused

__all__ = ["Batch", "Budget", "Slot", "StagingJob", "no_gc", "stage"]

_CPU_STAGING = "view"
"""How CPU ``jax.Array``s are staged: ``"view"`` (computed arrays held through a NumPy view,
others copied into ``pinned_host`` memory), ``"device"`` (an on-device copy, enqueued),
``"host"`` (a parallel copy into host memory) or ``"pinned_host"`` (an enqueued copy into the
``pinned_host`` memory kind: the accelerators' way, selectable on CPU to test it). A module
constant so measurements and tests can compare them; see the module docstring."""

_ACCELERATOR_STAGING = "pinned_host"
"""How accelerator ``jax.Array``s are staged: ``"pinned_host"`` (an enqueued copy into
page-locked host memory, where the device offers that memory kind, else as ``"host"``) or
``"host"`` (``copy_to_host_async`` then ``np.asarray``)."""

_COPY_BLOCK = 8 << 20  # host copies are split into tasks of about this many bytes
_SMALL = 256 << 10  # a computed CPU array this small is cheaper to copy on the host (~3 us)
# than on the device (~60 us per array of dispatch)


class Budget:
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
        """Takes ``n`` bytes if they fit now (or nothing else is staged); whether it did."""
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
        """Gives back ``n`` bytes (written, or dropped)."""
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    @property
    def used(self) -> int:
        """Bytes held now."""
        return self._used


class Batch:
    """Copies enqueued together (on the device, or into pinned host memory). The writer lets
    them all finish before it reads any: copying and writing at once only slow each other
    down (and a donated next step waits for the copies)."""

    __slots__ = ("copies", "done")

    def __init__(self, copies: list[Any]) -> None:
        self.copies: list[Any] | None = copies
        self.done = False

    def wait(self) -> None:
        """Blocks until every copy of the batch is made (once)."""
        if not self.done:
            copies = self.copies
            if copies is not None:
                jax.block_until_ready(copies)
            self.copies, self.done = None, True


class Slot:
    """One staged buffer: the copy the chunks are read from, and how many chunks are left."""

    __slots__ = ("array", "ready", "remaining", "nbytes", "held", "batch")

    def __init__(self, remaining: int, nbytes: int) -> None:
        self.array: Any = None
        self.ready = False  # set under the job's condition, once `array` is the staged copy
        self.remaining = remaining
        self.nbytes = nbytes
        self.held = 0  # budget bytes this slot holds
        self.batch: Batch | None = None  # for an on-device copy


class StagingJob(Protocol):
    """What :func:`stage` needs of a save job (``job._Job``)."""

    slots: list[Slot]
    finished: bool  # the writer finished (failed): stop staging

    def hold(self, slots: Sequence[Slot]) -> bool:
        """Records that ``slots`` hold their budget; False if the copies were dropped."""
        ...

    def set_ready(self, staged: Sequence[tuple[Slot, Any]]) -> None:
        """Hands staged copies to the writer."""
        ...


def _pinned(array: jax.Array) -> jax.sharding.Sharding | None:
    """Where a single-device array's pinned host copy goes: its device's ``pinned_host``
    memory, or None if the device has none."""
    device = next(iter(array.devices()))
    if device not in _PINNED:
        kinds = {memory.kind for memory in device.addressable_memories()}
        _PINNED[device] = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
                           if "pinned_host" in kinds else None)
    return _PINNED[device]


_PINNED: dict[Any, jax.sharding.Sharding | None] = {}  # per device (a handful)


def _ready(array: jax.Array) -> bool:
    """Whether ``array`` is computed (``is_ready`` exists on every ``jax.Array`` at run
    time but is missing from the type stub)."""
    return bool(array.is_ready())  # type: ignore[attr-defined]


class _Copies:
    """The copies of one staging pass, grouped by kind and made together by :meth:`flush`."""

    def __init__(self, job: StagingJob) -> None:
        self.job = job
        self.device: list[tuple[Slot, jax.Array]] = []
        self.pinned: list[tuple[Slot, jax.Array, jax.sharding.Sharding]] = []
        self.views: list[tuple[Slot, np.ndarray]] = []  # held, not copied
        self.to_host: list[tuple[Slot, jax.Array]] = []
        self.host: list[tuple[Slot, np.ndarray]] = []

    def add(self, slot: Slot, buffer: checkpoint.SourceBuffer) -> int:
        """Queues the copy of one buffer, or the view it is read through (or hands over one the
        plan owns); returns the bytes it stages (copied, or held through a view)."""
        array = buffer.array
        if buffer.owned:
            self.job.set_ready([(slot, array)])
            return 0
        if not isinstance(array, jax.Array):
            self.host.append((slot, array))
        elif array.platform() != "cpu":
            pinned = _pinned(array) if _ACCELERATOR_STAGING == "pinned_host" else None
            if pinned is not None:
                self.pinned.append((slot, array, pinned))
            else:
                self.to_host.append((slot, array))
        elif _CPU_STAGING == "view" and _ready(array):
            self.views.append((slot, np.asarray(array)))  # see the module docstring
        elif _CPU_STAGING in ("view", "pinned_host") and (pinned := _pinned(array)) is not None:
            self.pinned.append((slot, array, pinned))
        elif _CPU_STAGING != "host" and (slot.nbytes > _SMALL or not _ready(array)):
            self.device.append((slot, array))
        else:
            self.host.append((slot, np.asarray(array)))
        return slot.nbytes

    def flush(self) -> None:
        """Makes (or enqueues) the queued copies and hands them to the writer."""
        staged: list[tuple[Slot, Any]] = list(self.views)
        self.views.clear()
        if self.device:
            copies = jax.device_put([a for _, a in self.device], may_alias=False)
            batch = Batch(list(copies))
            for (slot, _), copy in zip(self.device, copies):
                slot.batch = batch
                staged.append((slot, copy))
            self.device.clear()
        if self.pinned:
            copies = jax.device_put([a for _, a, _ in self.pinned],
                                    [s for _, _, s in self.pinned], may_alias=False)
            batch = Batch(list(copies))
            for (slot, _, _), copy in zip(self.pinned, copies):
                slot.batch = batch
                staged.append((slot, copy))
            self.pinned.clear()
        if self.to_host:
            for _, array in self.to_host:
                array.copy_to_host_async()
            staged.extend((slot, np.asarray(array)) for slot, array in self.to_host)
            self.to_host.clear()
        if self.host:
            copies = _host_copies([a for _, a in self.host])
            staged.extend((slot, copy) for (slot, _), copy in zip(self.host, copies))
            self.host.clear()
        self.job.set_ready(staged)


def stage(job: StagingJob, buffers: Sequence[checkpoint.SourceBuffer], budget: Budget,
          limit: int | None) -> tuple[int, float]:
    """Copies what must be copied into the job's slots (one per buffer), in source order,
    within the budget; returns (bytes copied, seconds waited for the budget)."""
    copies = _Copies(job)
    copied = 0
    waited = 0.0
    if limit is None:
        # No budget to wait for: take it all at once, stage in one go.
        budget.add(sum(slot.nbytes for slot in job.slots))
        if job.hold(job.slots):
            for slot, buffer in zip(job.slots, buffers):
                copied += copies.add(slot, buffer)
        copies.flush()
        return copied, waited
    for slot, buffer in zip(job.slots, buffers):
        if job.finished:
            break  # the writer failed; the caller gets its error
        n = slot.nbytes
        if not budget.try_acquire(n, limit):
            copies.flush()
            t = time.perf_counter()
            budget.acquire(n, limit, lambda: job.finished)
            waited += time.perf_counter() - t
        if not job.hold([slot]):
            break  # the writer failed and dropped the copies; the caller gets its error
        copied += copies.add(slot, buffer)
    copies.flush()
    return copied, waited


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector: taking apart and staging a tree of
    thousands of arrays allocates enough objects to trigger full collections, which (with
    JAX's hundreds of thousands of objects alive) cost more than the work itself (10,000
    arrays: 0.7 s blocking with it, 0.3 s without). Nothing here makes reference cycles.
    Counted with every other pause (:func:`keepax._src.util.gc_paused`), so a background
    save's pause and the caller's never switch the collector back on under each other."""
    with gc_paused():
        yield


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
