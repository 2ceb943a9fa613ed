"""grain users: a DataLoader's iterator state (``get_state``/``set_state``) saved with the
step by a manager resumes at the same element, and training continues as if uninterrupted."""

from __future__ import annotations

import grain.python as grain
import numpy as np

import keepax


def _loader() -> grain.DataLoader:
    source = [np.full((2,), i, dtype=np.int32) for i in range(40)]
    sampler = grain.IndexSampler(
        num_records=len(source), shuffle=True, seed=7, num_epochs=2,
        shard_options=grain.NoSharding(),
    )
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[grain.Batch(batch_size=4)], worker_count=0,
    )


def test_iterator_resumes_at_the_same_element(tmp_path) -> None:
    reference = [b.tolist() for b in _loader()]

    it = iter(_loader())
    seen = [next(it).tolist() for _ in range(5)]
    total = np.int64(sum(sum(map(sum, b)) for b in seen))
    with keepax.CheckpointManager(tmp_path / "run", async_save=False) as mngr:
        mngr.save(5, {"total": total, "data_iter": it})

    fresh = iter(_loader())
    with keepax.CheckpointManager(tmp_path / "run") as mngr:
        state = mngr.restore(like={"total": np.int64(0), "data_iter": fresh})
    assert state["data_iter"] is fresh and state["total"] == total
    rest = [b.tolist() for b in fresh]
    assert seen + rest == reference
    assert len(rest) == len(reference) - 5
