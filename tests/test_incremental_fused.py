"""Digested writing: a chunk predicted to have changed is digested by its writer while it is
written (one pass over its bytes). The prediction is a hint only: its digests are those of
the whole chunks, a mispredicted duplicate keeps a complete copy, and nothing dangles."""

from __future__ import annotations

import os

import numpy as np
import pytest

import keepax
from keepax._src.format import digests, spec
from keepax._src.format.manifest import ArrayLeaf, Manifest

N = 1 << 19  # float32 elements: 2 MiB leaves, digested when predicted changed (>= 1 MiB)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"w{i}": rng.standard_normal(N, dtype=np.float32) for i in range(3)}


def _manifest(d: str, step: int) -> Manifest:
    path = os.path.join(d, f"{step:08d}", "manifest.json")
    with open(path, "rb") as f:
        return Manifest.from_json(f.read(), where=path)


def _store(d: str) -> dict[str, int]:
    data = os.path.join(d, spec.STORE_DIR, "data")
    if not os.path.isdir(data):
        return {}
    return {f: os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)}


def _check(d: str, step: int, state: dict[str, np.ndarray]) -> None:
    """Restores bit-exact, verifies, and finds each chunk's digest to be its bytes'."""
    path = os.path.join(d, f"{step:08d}")
    got = keepax.restore(path)
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)
    assert keepax.verify(path) == []
    manifest = _manifest(d, step)
    assert len(manifest.leaves) == len(state)
    for name, leaf in zip(sorted(state), manifest.leaves):
        assert isinstance(leaf, ArrayLeaf)
        value = state[name]
        for c in leaf.chunks:
            assert c.digest == digests.digest(value[c.start[0]: c.start[0] + c.shape[0]])


@pytest.mark.parametrize("block", [1, 7, 4096, 1 << 20, 3 << 20])
def test_a_streamed_digest_is_the_digest_of_the_whole(block: int) -> None:
    a = np.random.default_rng(0).standard_normal((1 << 19) + 3, dtype=np.float32)
    view = memoryview(a.view(np.uint8))
    if block < 4096:
        view = view[: 1 << 14]  # small blocks: a shorter array
        a = a[: (1 << 14) // 4]
    d = digests.Streaming()
    for at in range(0, len(view), block):
        d.update(view[at: at + block])
    assert d.value() == digests.digest(a)
    assert digests.Streaming().value() == digests.digest(np.zeros(0, np.float32))


def test_a_sample_tells_changed_arrays_apart_and_skips_strided_ones() -> None:
    a = np.random.default_rng(0).standard_normal(N, dtype=np.float32)
    assert digests.sample(a) == digests.sample(a.copy())
    assert digests.sample(a) != digests.sample(a + 1)
    assert digests.sample(a[::2]) is None
    assert digests.sample(np.zeros(7, np.uint8)) is not None


def test_a_fully_changing_state_is_digested_while_written(tmp_path, digest_calls) -> None:
    d = str(tmp_path / "run")
    states = [_state(s) for s in range(3)]
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        for step, state in enumerate(states):
            m.save(step, state)
    assert digest_calls == []  # the first into an empty store, then every chunk changed
    for step, state in enumerate(states):
        _check(d, step, state)


def test_a_mispredicted_duplicate_keeps_its_new_copy_then_is_hashed(tmp_path,
                                                                    digest_calls) -> None:
    d = str(tmp_path / "run")
    a, b = _state(1), _state(2)
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(0, a)
        first = set(_store(d))
        m.save(1, b)
        before = _store(d)
        m.save(2, a)  # every sample differs from step 1's: digested, though a is stored
        assert digest_calls == []
        new = set(_store(d)) - set(before)
        assert new and sum(_store(d)[f] for f in new) >= 3 * N * 4
        refs = {f.name.rsplit("/", 1)[1] for f in _manifest(d, 2).files}
        assert refs <= new  # refers to its own complete copy
        m.save(3, a)  # samples unchanged since step 2: hashed first, found stored
        assert len(digest_calls) == 3
        assert set(_store(d)) == set(before) | new
        m.delete(0)
        m.delete(1)
        m.delete(2)
        m.wait_until_finished()
        # Step 3 refers to step 0's copy (the first its digests were learned from): step 1's
        # and step 2's files are gone, nothing dangles.
        assert set(_store(d)) == first
        _check(d, 3, a)


def test_equal_chunks_of_a_first_save_are_mostly_stored_once(tmp_path, digest_calls) -> None:
    d = str(tmp_path / "run")
    zeros = {f"m{i}": np.zeros(N, np.float32) for i in range(4)}
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(0, zeros)
    # The first is digested while written; the others share its sample, so are hashed first
    # (and stored once among themselves): two copies, not four.
    assert len(digest_calls) == 3
    data = sum(_store(d).values())
    assert 2 * N * 4 <= data < 3 * N * 4
    _check(d, 0, zeros)


def test_compressed_saves_hash_first(tmp_path, digest_calls) -> None:
    d = str(tmp_path / "run")
    state = _state(0)
    with keepax.CheckpointManager(d, incremental=True, async_save=False,
                                  compression="zstd") as m:
        m.save(0, state)
    assert len(digest_calls) == 3
    _check(d, 0, state)
