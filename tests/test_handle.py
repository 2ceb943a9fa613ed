"""Tests of the ``keepax.open`` handle: one parse, then info, restore, streaming and verify."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

import keepax


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ckpt")
    tree = {
        "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": jnp.ones(4)},
        "step": 5,
        "name": "run",
    }
    keepax.save(path, tree, metadata={"loss": 0.5})
    return path, tree


def test_open_gives_the_same_info_and_restore_as_the_functions(saved) -> None:
    path, tree = saved
    ckpt = keepax.open(path)
    assert ckpt.info == keepax.inspect(path)
    assert ckpt.metadata == {"loss": 0.5}
    out = ckpt.restore(like=tree)
    np.testing.assert_array_equal(out["params"]["w"], tree["params"]["w"])
    assert out["step"] == 5 and out["name"] == "run"
    part = ckpt.restore(select=["params/w"])
    np.testing.assert_array_equal(part["params"]["w"], tree["params"]["w"])
    assert "Checkpoint(" in repr(ckpt)


def test_iter_leaves_streams_every_selected_leaf_in_order(saved) -> None:
    path, tree = saved
    ckpt = keepax.open(path)
    got = [(info.path, value) for info, value in ckpt.iter_leaves()]
    assert [p for p, _ in got] == [leaf.path for leaf in ckpt.info.leaves]
    by_path = dict(got)
    np.testing.assert_array_equal(by_path["['params']['w']"], tree["params"]["w"])
    assert isinstance(by_path["['params']['b']"], np.ndarray)
    assert by_path["['step']"] == 5
    only = [info.path for info, _ in ckpt.iter_leaves(select=["params"])]
    assert only == ["['params']['b']", "['params']['w']"]
    with pytest.raises(keepax.KeepaxError, match="matches no leaf"):
        list(ckpt.iter_leaves(select=["nope"]))


def test_chunks_expose_checksums_and_verify_finds_damage(saved) -> None:
    path, _ = saved
    ckpt = keepax.open(path)
    chunks = ckpt.chunks("['params']['w']")
    assert chunks and all(c.leaf == "['params']['w']" for c in chunks)
    assert sum(c.nbytes for c in chunks) == 12 * 4
    assert ckpt.verify() == []
    damaged = f"{path}/{chunks[0].file}"  # its last byte belongs to the last chunk stored
    with open(damaged, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = keepax.open(path).verify()
    assert len(problems) == 1 and chunks[0].file in problems[0]


def test_open_of_a_missing_checkpoint_names_it(tmp_path) -> None:
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="does not exist"):
        keepax.open(str(tmp_path / "missing"))


# A checkpoint deleted while it is read (a manager's retention removing it) is gone, not damaged.


def _retired_step(tmp_path) -> tuple[keepax.Checkpoint, str, dict]:
    """Opens step 1 of a manager run, then lets retention delete it (a real deletion: renamed
    to a trash name, then removed); returns the handle opened before the deletion."""
    tree = {"w": np.arange(1024, dtype=np.float32).reshape(32, 32), "step": 1}
    with keepax.CheckpointManager(str(tmp_path / "run"), keep=[keepax.policies.KeepLast(1)],
                                  async_save=False) as manager:
        manager.save(1, tree)
        path = manager.metadata(1).path
        ckpt = keepax.open(path)
        manager.save(2, tree)
        manager.wait_until_finished()
        assert manager.all_steps() == [2]
    return ckpt, path, tree


def test_a_step_deleted_after_open_is_reported_as_deleted_not_damaged(tmp_path) -> None:
    ckpt, path, tree = _retired_step(tmp_path)
    assert ckpt.info.leaves  # the description was read when the handle was made
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="deleted while being read"):
        ckpt.restore(like=tree)
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="deleted while being read"):
        list(ckpt.iter_leaves())
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="deleted while being"):
        ckpt.verify()
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="does not exist") as info:
        keepax.inspect(path)
    assert "never finished" not in str(info.value)


def test_deleting_the_commit_marker_first_reads_as_deleted_and_missing_data_as_damage(
    saved,
) -> None:
    """Object stores delete a checkpoint's commit marker before its other files; with the
    marker still there, a missing data file is damage."""
    path, tree = saved
    ckpt = keepax.open(path)
    data = sorted(p for p in os.listdir(f"{path}/data"))
    os.remove(f"{path}/data/{data[0]}")
    with pytest.raises(keepax.errors.CorruptCheckpointError, match="missing"):
        ckpt.restore(like=tree)
    os.remove(f"{path}/keepax.commit")
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="deleted while being read"):
        ckpt.restore(like=tree)


def test_the_unfinished_save_hint_ignores_trash_left_by_a_deletion(saved) -> None:
    path, _ = saved
    os.rename(path, f"{path}.keepax-trash-0123456789ab")  # what retention's first phase does
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="does not exist") as info:
        keepax.restore(path)
    assert "never finished" not in str(info.value)
    os.rename(f"{path}.keepax-trash-0123456789ab", f"{path}.keepax-old-0123456789ab")
    with pytest.raises(keepax.errors.CheckpointNotFoundError) as info:
        keepax.inspect(path)
    assert "never finished" not in str(info.value)
    os.mkdir(f"{path}.keepax-tmp-0123456789ab")  # a save's staging directory
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="never finished"):
        keepax.inspect(path)
