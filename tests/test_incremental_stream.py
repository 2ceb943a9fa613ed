"""Incremental saves stream their chunks (bounded memory on strided states) and skip hashing
the previous save's unchanged ``jax.Array`` objects (a hint that correctness never rests on)."""

from __future__ import annotations

import gc
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keepax
from keepax._src.format import digests, spec


def _store_files(d: str) -> set[str]:
    data = os.path.join(d, spec.STORE_DIR, "data")
    return set(os.listdir(data)) if os.path.isdir(data) else set()


@pytest.mark.parametrize("view", ["columns", "transposed", "fortran", "rows"])
def test_digest_of_any_layout_is_the_digest_of_its_c_order_bytes(view: str) -> None:
    a = np.random.default_rng(0).standard_normal((1500, 1200)).astype(np.float32)
    x = {"columns": a[:, ::3], "transposed": a.T, "fortran": np.asfortranarray(a),
         "rows": a[::2]}[view]
    assert digests.digest(x) == digests.digest(np.ascontiguousarray(x))
    assert digests.digest(x) != digests.digest(np.ascontiguousarray(x)[::-1])


def test_a_strided_state_is_saved_without_copying_it_whole(tmp_path) -> None:
    # 8 leaves of 16 MiB, each every other column of a 32 MiB array: 128 MiB of new chunks
    # none of which is contiguous. Hashing and writing copy them out in 8 MiB blocks.
    rng = np.random.default_rng(1)
    parents = [rng.standard_normal((2048, 4096), dtype=np.float32) for _ in range(8)]
    state = {f"w{i}": p[:, ::2] for i, p in enumerate(parents)}
    logical = sum(v.nbytes for v in state.values())
    with keepax.CheckpointManager(str(tmp_path / "run"), incremental=True,
                                  async_save=False) as m:
        tracemalloc.start()
        try:
            m.save(0, state)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        got = m.restore(0)
    assert peak < logical // 2, (peak, logical)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("async_save", [False, True])
def test_the_same_jax_array_is_not_hashed_again(tmp_path, digest_calls, async_save) -> None:
    frozen = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=async_save) as m:
        m.save(0, {"frozen": frozen, "adapter": jnp.zeros(8)})
        m.wait_until_finished()
        assert len(digest_calls) == 2
        files = _store_files(d)
        m.save(1, {"frozen": frozen, "adapter": jnp.ones(8)})
        m.wait_until_finished()
        # Only the new adapter was hashed, and only it was written (one new store file).
        assert len(digest_calls) == 3
        assert len(_store_files(d) - files) == 1
        changed = frozen + 1
        m.save(2, {"frozen": changed, "adapter": jnp.ones(8)})
        m.wait_until_finished()
        assert len(digest_calls) == 5  # a new object is hashed, even where the adapter was not
        for step, want in ((1, frozen), (2, changed)):
            np.testing.assert_array_equal(m.restore(step)["frozen"], np.asarray(want))
        np.testing.assert_array_equal(m.restore(2)["adapter"], np.ones(8))


def test_an_array_that_died_is_hashed_and_its_successor_saved(tmp_path, digest_calls) -> None:
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        x = jnp.full((256,), 1.0)
        m.save(0, {"x": x})
        del x
        gc.collect()
        # A new object (possibly at the dead one's address) is never taken for it.
        y = jnp.full((256,), 2.0)
        m.save(1, {"x": y})
        assert len(digest_calls) == 2
        np.testing.assert_array_equal(m.restore(1)["x"], np.full((256,), 2.0))
        np.testing.assert_array_equal(m.restore(0)["x"], np.full((256,), 1.0))


def test_a_hinted_array_whose_stored_copy_was_deleted_is_written_again(tmp_path,
                                                                        digest_calls) -> None:
    frozen = jax.device_put(np.arange(1024, dtype=np.float32))
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(0, {"frozen": frozen})
        m.delete(0)  # the only step referring to frozen's stored copy: the copy goes
        m.wait_until_finished()
        assert _store_files(d) == set()
        m.save(1, {"frozen": frozen})  # known by its hint, not stored: written again
        assert len(digest_calls) == 1
        assert len(_store_files(d)) == 1
        np.testing.assert_array_equal(m.restore(1)["frozen"], np.arange(1024, dtype=np.float32))
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(2, {"frozen": frozen})  # a new manager has no hints: hashed, found stored
        assert len(digest_calls) == 2
        assert len(_store_files(d)) == 1
        np.testing.assert_array_equal(m.restore(2)["frozen"], np.arange(1024, dtype=np.float32))


@pytest.mark.timeout(60)
def test_hinted_staged_copies_are_released_under_a_small_staging_budget(tmp_path,
                                                                        digest_calls) -> None:
    # Staged copies are released as their chunks are read: a hinted chunk is still read once,
    # or later leaves would wait forever for budget it holds.
    frozen = {f"l{i}": jnp.full((16384,), float(i)) for i in range(6)}  # 64 KiB each
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=True,
                                  staging_budget_bytes=160 << 10) as m:
        for step in range(3):
            m.save(step, {"frozen": frozen, "step": jnp.full((4,), step)})
        m.wait_until_finished()
        assert len(digest_calls) == 6 + 3
        got = m.restore(2)
    for i in range(6):
        np.testing.assert_array_equal(got["frozen"][f"l{i}"], np.full((16384,), float(i)))
    np.testing.assert_array_equal(got["step"], np.full((4,), 2))
