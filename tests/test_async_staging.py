"""How an asynchronous save stages arrays: computed CPU ``jax.Array``s held through a NumPy
view (no copy), copies into ``pinned_host`` memory (the accelerators' way, run here on CPU
JAX, which offers that memory kind too), and the JAX behaviour the view relies on.

End-to-end donation, deletion and mutation after ``save_async`` returns are in
``test_async.py`` (its ``staging`` fixture runs every way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keepax
from keepax._src import checkpoint
from keepax._src.async_engine import staging as async_staging
from keepax._src.async_engine.staging import Budget, Slot, stage


class StubJob:
    """The part of a save job :func:`stage` uses, keeping what it hands over."""

    def __init__(self, buffers: Sequence[checkpoint.SourceBuffer]) -> None:
        self.slots = [Slot(1, b.nbytes) for b in buffers]
        self.finished = False
        self.ready: list[tuple[Slot, Any]] = []

    def hold(self, slots: Sequence[Slot]) -> bool:
        for slot in slots:
            slot.held = slot.nbytes
        return True

    def set_ready(self, staged: Sequence[tuple[Slot, Any]]) -> None:
        for slot, array in staged:
            slot.array, slot.ready = array, True
        self.ready.extend(staged)


def staged(arrays: Sequence[Any]) -> tuple[StubJob, int]:
    buffers = [checkpoint.SourceBuffer(a, [(i, ())]) for i, a in enumerate(arrays)]
    job = StubJob(buffers)
    copied, _ = stage(job, buffers, Budget(), None)
    return job, copied


def test_computed_cpu_arrays_are_read_through_views_not_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(async_staging, "_CPU_STAGING", "view")
    big = jnp.arange(1 << 18, dtype=jnp.float32) * 2  # 1 MiB, above the host-copy size
    small = jnp.ones(7, jnp.bfloat16)
    jax.block_until_ready((big, small))
    host = np.arange(5.0)
    job, counted = staged([big, small, host])
    assert counted == big.nbytes + small.nbytes + host.nbytes
    arrays = [slot.array for slot in job.slots]
    assert all(slot.ready and slot.batch is None for slot in job.slots)
    assert np.shares_memory(arrays[0], np.asarray(big))  # the caller's buffer, not a copy
    assert arrays[0].ctypes.data == big.unsafe_buffer_pointer()
    assert np.shares_memory(arrays[1], np.asarray(small))
    assert not np.shares_memory(arrays[2], host)  # NumPy arrays are mutable: copied
    np.testing.assert_array_equal(arrays[2], host)


def test_a_view_keeps_its_bytes_through_donation_and_deletion() -> None:
    """What the view staging relies on: XLA's CPU runtime copies a donated buffer that has
    an external reference (a NumPy view), and deletion frees it only once the view is gone.
    If a JAX release changes this, this test says so before any checkpoint is wrong."""
    x = jnp.arange(1 << 16, dtype=jnp.float32) + 1
    y = jnp.arange(1 << 16, dtype=jnp.float32) + 2
    want_x, want_y = np.array(x), np.array(y)
    view_x, view_y = np.asarray(x), np.asarray(y)
    overwrite = jax.jit(lambda a: a * 0 - 7, donate_argnums=0)
    out = overwrite(x)
    y.delete()
    garbage = [jnp.full(1 << 16, 9.0, jnp.float32) for _ in range(8)]
    jax.block_until_ready((out, garbage))
    assert float(out[0]) == -7.0
    np.testing.assert_array_equal(view_x, want_x)
    np.testing.assert_array_equal(view_y, want_y)


def test_pinned_host_copies_are_enqueued_as_one_batch(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(async_staging, "_CPU_STAGING", "pinned_host")
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    assert "pinned_host" in kinds  # CPU JAX offers it; accelerators take this path
    a = jnp.arange(1 << 18, dtype=jnp.float32)
    b = jnp.arange(12, dtype=jnp.int8).reshape(3, 4)
    job, counted = staged([a, b])
    assert counted == a.nbytes + b.nbytes
    batch = job.slots[0].batch
    assert batch is not None and job.slots[1].batch is batch
    batch.wait()
    assert batch.done and batch.copies is None
    for slot, source in zip(job.slots, (a, b)):
        assert slot.array.sharding.memory_kind == "pinned_host"
        assert slot.array.unsafe_buffer_pointer() != source.unsafe_buffer_pointer()
        np.testing.assert_array_equal(checkpoint.chunk_view(slot.array, ()), np.asarray(source))


def test_pinned_host_staging_saves_bit_exact_after_donation(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(async_staging, "_CPU_STAGING", "pinned_host")
    tree = {"w": jnp.arange(300_000, dtype=jnp.float32).reshape(600, 500),
            "b": jnp.linspace(0, 1, 33, dtype=jnp.bfloat16)}
    want = {k: np.array(v) for k, v in tree.items()}
    handle = keepax.save_async(str(tmp_path / "ckpt"), tree)
    tree["w"] = jax.jit(lambda w: w * 0, donate_argnums=0)(tree["w"])
    tree["b"].delete()
    record = handle.wait(timeout=60)
    assert record.committed and record.staging_bytes == sum(v.nbytes for v in want.values())
    got = keepax.restore(str(tmp_path / "ckpt"))
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes()


def test_cpu_arrays_still_being_computed_get_an_enqueued_pinned_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A view would wait for the computation; an enqueued copy does not. (Whether an array
    is computed yet depends on timing, so ``_ready`` is made to say it is not.)"""
    monkeypatch.setattr(async_staging, "_CPU_STAGING", "view")
    monkeypatch.setattr(async_staging, "_ready", lambda array: False)
    x = jnp.arange(1 << 16, dtype=jnp.int32) * 3
    job, counted = staged([x])
    (slot,) = job.slots
    assert counted == x.nbytes and slot.batch is not None
    slot.batch.wait()
    assert slot.array.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(checkpoint.chunk_view(slot.array, ()), np.asarray(x))
