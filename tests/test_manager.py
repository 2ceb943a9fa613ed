"""CheckpointManager: steps, items, iterator state, when to save, what to keep, bad input."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keepax
from keepax import policies
from keepax._src.io import open_root
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    KeepaxError,
    KeepaxWarning,
    ManagerClosedError,
    PolicyError,
    StepOrderError,
    TreeMismatchError,
    UnsupportedLeafError,
)

# ---------------------------------------------------------------------------------------------
# Helpers.


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingIterator:
    """A toy data iterator: yields 0, 1, 2, ...; its state is its position."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> int:
        self.position += 1
        return self.position - 1

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class PythonRandom:
    """A Python ``random.Random`` whose state is saved as JSON-like data (no pickle)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def get_state(self) -> dict[str, object]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def set_state(self, state: dict[str, object]) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def make_state(step: int) -> dict[str, object]:
    return {
        "params": {"w": np.full((4, 3), step, np.float32),
                   "b": np.arange(3, dtype=np.float32) + step},
        "opt_state": {"mu": np.full((4, 3), -step, np.float32), "count": np.int32(step)},
        "extra": {"note": f"step {step}", "lr": 0.1},
    }


def to_jax(tree: object) -> object:
    return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, tree)


def assert_tree_equal(a: object, b: object) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def manager(directory: str, **kwargs: object) -> keepax.CheckpointManager:
    kwargs.setdefault("clock", FakeClock())
    return keepax.CheckpointManager(directory, **kwargs)


def names_in(directory: str) -> list[str]:
    """The visible entries of a directory (not the lock file or staging leftovers)."""
    return [n for n in open_root(directory).list("") if ".keepax-" not in n]


def storage_class(directory: str) -> type:
    return type(open_root(directory))


# ---------------------------------------------------------------------------------------------
# Steps: save, list, restore, restart.


def test_save_list_restore(directory: str) -> None:
    with manager(directory) as mngr:
        assert (mngr.all_steps(), mngr.latest_step()) == ([], None)
        for step in (0, 5, 10):
            assert mngr.save(step, make_state(step), metrics={"loss": 1.0 / (step + 1)})
        assert mngr.all_steps() == [0, 5, 10] and mngr.latest_step() == 10
        assert_tree_equal(mngr.restore(), make_state(10))
        assert_tree_equal(mngr.restore(5), make_state(5))
        like = to_jax(make_state(0))
        back = mngr.restore(5, like)
        assert isinstance(back["params"]["w"], jax.Array)
        assert_tree_equal(back, to_jax(make_state(5)))
        assert mngr.metrics(5) == {"loss": pytest.approx(1 / 6)}
        assert "3 steps, latest 10" in repr(mngr)


def test_a_step_deleted_while_listing_is_skipped_without_a_warning(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with manager(directory) as writer:
        writer.save(1, make_state(1))
        writer.save(2, make_state(2))
    cls = storage_class(directory)
    real_list = cls.list

    def list_then_delete(self, path: str) -> list[str]:  # noqa: ANN001
        names = real_list(self, path)
        if path == "" and "00000001" in names:
            self.delete("00000001")  # another process's retention, between list and open
        return names

    monkeypatch.setattr(cls, "list", list_then_delete)
    with manager(directory, read_only=True) as reader:  # warnings are errors in this suite
        assert reader.all_steps() == [2]


def test_restart_sees_the_same_steps_and_reads_step_numbers_from_manifests(
    directory: str,
) -> None:
    with manager(directory) as mngr:
        mngr.save(3, make_state(3), metrics={"loss": 0.5}, metadata={"run": "a"})
        mngr.save(7, make_state(7))
    info = keepax.inspect(f"{directory}/00000007")
    assert info.metadata["keepax.manager"]["step"] == 7
    storage = open_root(directory)
    storage.rename_dir("00000007", "renamed")  # the name no longer tells the step
    with manager(directory) as again:
        assert again.all_steps() == [3, 7]
        assert again.metadata(7).name == "renamed"
        assert again.metadata(3).metadata == {"run": "a"}
        assert again.metrics(3) == {"loss": 0.5}
        assert_tree_equal(again.restore(7), make_state(7))


def test_metadata_holds_user_metadata_time_duration_size_and_kind(directory: str) -> None:
    clock = FakeClock(5000.0)
    with manager(directory, clock=clock) as mngr:
        mngr.save(2, make_state(2), metadata={"git": "abc", "nested": {"x": [1, 2]}})
        info = mngr.metadata(2)
    assert isinstance(info, keepax.StepInfo)
    assert info.step == 2 and info.name == "00000002" and info.path.endswith("/00000002")
    assert info.metadata == {"git": "abc", "nested": {"x": [1, 2]}}
    assert info.time == 5000.0 and not info.temporary
    assert info.duration is not None and 0 <= info.duration < 60
    assert abs(info.created - time.time()) < 60
    assert info.nbytes >= 4 * 3 * 4 * 2 + 3 * 4  # the arrays' bytes at least
    assert info.metrics == {} and info.placeholders == {}


def test_item_metadata_describes_without_reading_arrays(directory: str) -> None:
    with manager(directory) as mngr:
        mngr.save(1, make_state(1))
        tree = mngr.item_metadata(1)
        assert tree == mngr.item_metadata()  # latest
    leaf = tree["params"]["w"]
    assert isinstance(leaf, keepax.LeafInfo)
    assert (leaf.shape, leaf.dtype, leaf.nbytes) == ((4, 3), "float32", 48)
    assert tree["extra"]["note"].value == "step 1"
    assert sorted(tree) == ["extra", "opt_state", "params"]


def test_reload_sees_another_writer(directory: str) -> None:
    writer = manager(directory)
    reader = manager(directory, read_only=True)
    writer.save(1, make_state(1))
    assert reader.all_steps() == []
    reader.reload()
    assert reader.all_steps() == [1]
    writer.delete(1)
    writer.wait_until_finished()
    reader.reload()
    assert reader.all_steps() == []
    writer.close()
    reader.close()


def test_delete(directory: str) -> None:
    with manager(directory) as mngr:
        for step in range(3):
            mngr.save(step, make_state(step))
        mngr.delete(1)
        assert mngr.all_steps() == [0, 2]
        mngr.wait_until_finished()
        assert names_in(directory) == ["00000000", "00000002"]
        with pytest.raises(CheckpointNotFoundError, match="available steps are: 0, 2"):
            mngr.delete(1)


def test_restore_or_initialize(directory: str) -> None:
    init = to_jax(make_state(0))
    with manager(directory) as mngr:
        state, step = mngr.restore_or_initialize(init)
        assert state is init and step is None
        mngr.save(4, to_jax(make_state(4)))
    with manager(directory) as mngr:
        state, step = mngr.restore_or_initialize(init)
    assert step == 4
    assert isinstance(state["params"]["w"], jax.Array)
    assert_tree_equal(state, to_jax(make_state(4)))


def test_closed_manager_refuses_work_and_close_is_idempotent(directory: str) -> None:
    mngr = manager(directory)
    mngr.save(1, make_state(1))
    mngr.close()
    mngr.close()
    calls = (lambda: mngr.save(2, make_state(2)), mngr.restore, mngr.reload,
             lambda: mngr.item_metadata(1), lambda: mngr.delete(1),
             lambda: mngr.event("epoch_end", 2, make_state(2)))
    for call in calls:
        with pytest.raises(ManagerClosedError, match="closed; build a new one") as info:
            call()
        assert info.value.path == directory
    assert mngr.all_steps() == [1]


def fail_trash_deletion(directory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes removing deleted steps' files (their trash directories) fail, as on a read-only
    file system."""
    cls = storage_class(directory)
    original = cls.delete

    def failing_delete(self: object, path: str) -> None:
        if ".keepax-trash-" in path:
            raise PermissionError(13, "Permission denied", path)
        original(self, path)

    monkeypatch.setattr(cls, "delete", failing_delete)


def test_exit_with_an_exception_in_flight_keeps_it_and_notes_background_errors(
    directory: str, monkeypatch
) -> None:
    fail_trash_deletion(directory, monkeypatch)
    with pytest.raises(ZeroDivisionError) as info:
        with manager(directory) as mngr:
            mngr.save(1, {"x": np.int32(1)})
            mngr.delete(1)
            1 / 0  # noqa: B018
    assert any("closing the CheckpointManager failed" in n and "step 1" in n
               for n in info.value.__notes__)


def test_garbage_collected_manager_releases_its_lock(directory: str) -> None:
    mngr = manager(directory)
    mngr.save(1, make_state(1))
    del mngr
    gc.collect()
    with manager(directory) as again:
        assert again.all_steps() == [1]


# ---------------------------------------------------------------------------------------------
# Named items.


def test_items_restore_alone_without_reading_the_others(directory: str) -> None:
    with manager(directory) as mngr:
        mngr.save(1, make_state(1))
        stats = keepax.RestoreStats()
        params = mngr.restore(items=["params"], stats=stats)
        assert list(params) == ["params"]
        assert_tree_equal(params, {"params": make_state(1)["params"]})
        assert stats.bytes_read == 4 * 3 * 4 + 3 * 4  # params' bytes only
        like = to_jax(make_state(0))
        both = mngr.restore(1, like, items=["params", "extra"])  # like: the whole state
        assert sorted(both) == ["extra", "params"]
        assert isinstance(both["params"]["w"], jax.Array)
        with pytest.raises(KeepaxError, match="'data' not in this step; it holds: extra, "
                                              "opt_state, params"):
            mngr.restore(items=["data"])


def test_items_restore_alone_when_another_item_is_corrupt(tmp_path) -> None:
    directory = str(tmp_path / "run")
    with manager(directory) as mngr:
        mngr.save(1, make_state(1))
        path = mngr.metadata(1).path
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        (chunk,) = next(x for x in manifest["leaves"] if x["path"] == "['opt_state']['mu']")[
            "chunks"]
        data = os.path.join(path, manifest["files"][chunk["file"]]["name"])
        with open(data, "r+b") as f:
            f.seek(chunk["offset"])
            byte = f.read(1)
            f.seek(chunk["offset"])
            f.write(bytes([byte[0] ^ 0xFF]))
        assert_tree_equal(mngr.restore(items=["params"])["params"], make_state(1)["params"])
        with pytest.raises(CorruptCheckpointError, match="opt_state"):
            mngr.restore()


# ---------------------------------------------------------------------------------------------
# Iterator and host state.


def test_iterator_state_saved_and_restored_in_place(directory: str) -> None:
    data, rng = CountingIterator(), PythonRandom(seed=0)
    nested = CountingIterator()
    with manager(directory) as mngr:
        for _ in range(5):
            next(data)
        rng.rng.random()
        nested.position = 9
        state = {**make_state(5), "data_iter": data, "rng": rng, "extra": {"inner": [nested]}}
        mngr.save(5, state)
        expected_draws = [rng.rng.random() for _ in range(3)]
        expected_next = next(data)

        fresh_data, fresh_rng, fresh_nested = CountingIterator(), PythonRandom(seed=123), (
            CountingIterator())
        like = {**make_state(0), "data_iter": fresh_data, "rng": fresh_rng,
                "extra": {"inner": [fresh_nested]}}
        back = mngr.restore(5, like)
        assert back["data_iter"] is fresh_data and back["rng"] is fresh_rng
        assert back["extra"]["inner"][0] is fresh_nested and fresh_nested.position == 9
        assert next(fresh_data) == expected_next
        assert [fresh_rng.rng.random() for _ in range(3)] == expected_draws
        assert_tree_equal(back["params"], make_state(5)["params"])

        raw = mngr.restore(5)  # without like: the saved states themselves
        assert raw["data_iter"] == {"position": 5}
        assert raw["extra"]["inner"] == [{"position": 9}]
        assert mngr.restore(5, {"data_iter": CountingIterator()}, items=["data_iter"])[
            "data_iter"].position == 5


def test_a_restore_reads_the_manifest_once(directory: str, monkeypatch) -> None:
    cls = storage_class(directory)
    original, opened = cls.open, []

    def counting_open(self: object, path: str) -> object:
        opened.append(path)
        return original(self, path)

    with manager(directory) as mngr:
        mngr.save(1, {**make_state(1), "data_iter": CountingIterator()})
        mngr.wait_until_finished()
        monkeypatch.setattr(cls, "open", counting_open)
        for like, items in ((None, None), ({**make_state(0), "data_iter": CountingIterator()},
                                           None), (make_state(0), ["params", "extra"])):
            opened.clear()
            mngr.restore(1, like, items=items)
            assert [p for p in opened if p.endswith("/manifest.json")] == ["00000001/manifest.json"]
            assert [p for p in opened if p.endswith("/keepax.commit")] == ["00000001/keepax.commit"]


def test_iterator_restore_is_strict_unless_partial(directory: str) -> None:
    with manager(directory) as mngr:
        mngr.save(1, {"params": {"w": np.ones(2)}, "data_iter": CountingIterator()})
        with pytest.raises(TreeMismatchError, match=r"\['params'\]\['w'\]: in the checkpoint"):
            mngr.restore(1, {"data_iter": CountingIterator()})
        it = CountingIterator()
        assert mngr.restore(1, {"data_iter": it}, partial=True)["data_iter"] is it
        with pytest.raises(TreeMismatchError, match="nothing there"):
            mngr.restore(1, {"params": {"w": np.ones(2)}, "data_iter": CountingIterator(),
                             "other": CountingIterator()})


def test_iterator_array_state_is_never_cast(directory: str) -> None:
    class ArrayState:
        def __init__(self) -> None:
            self.value = np.zeros(3, np.float32)

        def get_state(self) -> np.ndarray:
            return self.value

        def set_state(self, state: np.ndarray) -> None:
            self.value = state

    with manager(directory) as mngr:
        saved = ArrayState()
        saved.value = np.array([1.5, 2.5, 3.5], np.float32)
        mngr.save(1, {"w": np.ones(3, np.float32), "s": saved})
        target = ArrayState()
        like = {"w": jax.ShapeDtypeStruct((3,), jnp.bfloat16), "s": target}
        back = mngr.restore(1, like, dtype=jnp.bfloat16)
        assert back["w"].dtype == jnp.bfloat16
        assert target.value.dtype == np.float32
        np.testing.assert_array_equal(target.value, [1.5, 2.5, 3.5])


@pytest.mark.parametrize(
    ("state", "match", "remedy", "leaf"),
    [
        ({1, 2}, "returned a set", "keepax never pickles", "['loader']"),
        ({"f": lambda: 0}, "returned a function", "keepax never pickles", "['loader']['f']"),
        ({3: "x"}, "dict with key 3", r"need str keys \(as in JSON\)", "['loader']"),
        (np.array([object()]), "dtype object", r"jax\.random\.key_data", "['loader']"),
    ],
    ids=["set", "function", "int-key", "object-array"],
)
def test_iterator_state_must_be_json_like_or_arrays(directory: str, state: object, match: str,
                                                    remedy: str, leaf: str) -> None:
    class Bad:
        def get_state(self) -> object:
            return state

        def set_state(self, _: object) -> None:
            pass

    with manager(directory) as mngr:
        with pytest.raises(UnsupportedLeafError, match=f"{match}.*{remedy}") as info:
            mngr.save(1, {"params": np.ones(2), "loader": Bad()})
        assert (info.value.step, info.value.leaf) == (1, leaf)
        assert mngr.all_steps() == []


# ---------------------------------------------------------------------------------------------
# When to save.


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (None, list(range(12))),
        (policies.EveryNSteps(4), [0, 4, 8]),
        (policies.Stages.parse("every 2 until 6, then every 5"), [0, 2, 4, 10]),
        (policies.AtSteps([1, 7, 100]), [1, 7]),
    ],
    ids=["every-call", "every-n", "stages", "at-steps"],
)
def test_step_save_policies(directory: str, policy: object, expected: list[int]) -> None:
    with manager(directory, save_policy=policy) as mngr:
        decided = [s for s in range(12) if mngr.should_save(s)]
        saved = [s for s in range(12) if mngr.save(s, {"x": np.int32(s)})]
        assert decided == saved == expected == mngr.all_steps()


def test_interval_policy_makes_temporaries_replaced_by_the_next(directory: str) -> None:
    clock = FakeClock(0.0)
    policy = policies.AnyOf(policies.EveryNSteps(10), policies.EveryInterval(60))
    with manager(directory, save_policy=policy, clock=clock) as mngr:
        saved = {}
        for step in range(1, 25):
            clock.now += 25  # 25 s per step
            if mngr.save(step, {"x": np.int32(step)}):
                saved[step] = mngr.metadata(step).temporary
        # 60 s after the start (step 3), then 60 s after each save; permanent every 10 steps.
        assert saved == {3: True, 6: True, 9: True, 10: False, 13: True, 16: True, 19: True,
                         20: False, 23: True}
        mngr.wait_until_finished()
        assert mngr.all_steps() == [10, 20, 23]
        assert names_in(directory) == ["00000010", "00000020", "00000023"]


def test_temporary_left_by_a_previous_run_is_replaced(directory: str) -> None:
    clock = FakeClock(0.0)
    policy = policies.AnyOf(policies.EveryNSteps(100), policies.EveryInterval(60))
    with manager(directory, save_policy=policy, clock=clock) as mngr:
        clock.now = 70.0
        assert mngr.save(7, {"x": np.int32(7)})
        assert mngr.metadata(7).temporary
    clock.now = 100.0
    with manager(directory, save_policy=policy, clock=clock) as again:
        assert again.all_steps() == [7] and again.metadata(7).temporary
        # Its time is the last save time: 30 s later is too soon for another temporary.
        assert not again.should_save(8) and not again.save(8, {"x": np.int32(8)})
        clock.now = 131.0
        assert again.save(9, {"x": np.int32(9)})  # a new temporary replaces the old one
        assert again.all_steps() == [9]
        assert again.save(100, {"x": np.int32(100)})  # permanent replaces the temporary
        again.wait_until_finished()
        assert again.all_steps() == [100] and names_in(directory) == ["00000100"]


def test_temporary_is_upgraded_to_permanent_at_the_same_step(directory: str) -> None:
    clock = FakeClock(0.0)
    policy = policies.AnyOf(policies.AtSteps([5]), policies.EveryInterval(10))
    with manager(directory, save_policy=policy, clock=clock) as mngr:
        clock.now = 20.0
        assert mngr.save(4, {"x": np.int32(4)}) and mngr.metadata(4).temporary
        assert not mngr.save(4, {"x": np.int32(4)})  # already saved: skipped
        assert mngr.save(4, {"x": np.int32(44)}, force=True)  # upgraded, atomically
        assert not mngr.metadata(4).temporary
        assert int(mngr.restore(4)["x"]) == 44


def test_lifecycle_events_every_n_with_placeholders_in_names(directory: str) -> None:
    policy = policies.OnEvents(["epoch_end"], every_n=2)
    with manager(directory, save_policy=policy, template="epoch_{epoch}_step_{step}") as mngr:
        saved = []
        for epoch in range(1, 6):
            step = epoch * 100
            assert not mngr.save(step - 1, {"x": np.int32(step)}, epoch=epoch)  # no event
            assert not mngr.event("epoch_start", step, {"x": np.int32(step)}, epoch=epoch)
            if mngr.event("epoch_end", step, {"x": np.int32(step)}, epoch=epoch):
                saved.append(epoch)
        assert saved == [2, 4]
        assert mngr.all_steps() == [200, 400]
        assert mngr.metadata(400).name == "epoch_4_step_400"
        assert mngr.metadata(400).placeholders == {"epoch": 4}
        assert mngr.event("epoch_end", 600, {"x": np.int32(6)}, epoch=np.int64(6))
        assert mngr.metadata(600).placeholders == {"epoch": 6}
        assert names_in(directory) == ["epoch_2_step_200", "epoch_4_step_400", "epoch_6_step_600"]
        with pytest.raises(PolicyError, match="unknown event 'epoch_ending'"):
            mngr.event("epoch_ending", 500, {"x": np.int32(0)}, epoch=5)


def test_preemption_by_a_real_sigterm(directory: str) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    mngr = manager(directory, save_policy=policies.EveryNSteps(1000), preemption=True)
    try:
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        assert not mngr.save(1, {"x": np.int32(1)})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # let the interpreter run the handler
        assert not mngr.reached_preemption(1)
        assert mngr.should_save(2)
        assert mngr.save(2, {"x": np.int32(2)})  # regardless of the policy
        assert mngr.reached_preemption(2) and mngr.reached_preemption(3)
        assert not mngr.reached_preemption(1)
        assert not mngr.save(3, {"x": np.int32(3)})  # the policy again
        assert mngr.all_steps() == [2]
    finally:
        mngr.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_preemption_notified_by_hand_and_force(directory: str) -> None:
    with manager(directory, save_policy=policies.EveryNSteps(1000)) as mngr:
        assert not mngr.save(1, {"x": np.int32(1)})
        assert mngr.save(2, {"x": np.int32(2)}, force=True)
        mngr.notify_preemption()
        assert mngr.save(3, {"x": np.int32(3)}) and mngr.reached_preemption(3)


def test_preemption_handlers_need_the_main_thread(directory: str) -> None:
    errors = []

    def build() -> None:
        try:
            manager(directory, preemption=True)
        except PolicyError as e:
            errors.append(e)

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    manager(directory).close()  # the failed manager released the lock


# ---------------------------------------------------------------------------------------------
# What to keep.


def _save_steps(mngr: keepax.CheckpointManager, steps: range, loss: dict[int, float] | None = None
                ) -> None:
    for step in steps:
        metrics = {"loss": loss[step]} if loss and step in loss else None
        mngr.save(step, {"x": np.int32(step)}, metrics=metrics)
    mngr.wait_until_finished()


def test_keep_last_n(directory: str) -> None:
    with manager(directory, keep=[policies.KeepLast(2)]) as mngr:
        _save_steps(mngr, range(6))
        assert mngr.all_steps() == [4, 5]
        assert names_in(directory) == ["00000004", "00000005"]


def test_keep_every_k_forever_plus_last(directory: str) -> None:
    with manager(directory, keep=[policies.KeepEvery(4), policies.KeepLast(1)]) as mngr:
        _save_steps(mngr, range(11))
        assert mngr.all_steps() == [0, 4, 8, 10]


def test_keep_best_n_by_metric_and_newest_never_deleted(directory: str) -> None:
    loss = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5, 4: 2.0, 5: 9.0}
    keep = [policies.KeepBest(2, "loss", mode="min")]
    with manager(directory, keep=keep) as mngr:
        _save_steps(mngr, range(6), loss)
        assert mngr.all_steps() == [1, 3, 5]  # the best two, and the newest (the worst)
        assert mngr.best_step() == 3
        assert_tree_equal(mngr.restore("best"), {"x": np.int32(3)})
        assert "newest" in mngr.plan_deletions().reasons[5]


def test_plan_deletions_is_a_dry_run(directory: str) -> None:
    with manager(directory) as mngr:
        _save_steps(mngr, range(5))
    with manager(directory, keep=[policies.KeepLast(2)]) as mngr:
        plan = mngr.plan_deletions()
        assert (plan.keep, plan.delete) == ((3, 4), (0, 1, 2))
        assert "delete 0" in plan.describe()
        assert mngr.all_steps() == [0, 1, 2, 3, 4]  # nothing deleted until the next commit
        _save_steps(mngr, range(5, 6))
        assert mngr.all_steps() == [4, 5]


def test_background_deletion_does_not_stall_save(directory: str, monkeypatch) -> None:
    cls = storage_class(directory)
    release, started = threading.Event(), threading.Event()
    original = cls.delete

    def slow_delete(self: object, path: str) -> None:
        if ".keepax-trash-" in path:
            started.set()
            assert release.wait(10)
        original(self, path)

    monkeypatch.setattr(cls, "delete", slow_delete)
    with manager(directory, keep=[policies.KeepLast(1)]) as mngr:
        mngr.save(0, {"x": np.int32(0)})
        began = time.perf_counter()
        mngr.save(1, {"x": np.int32(1)})  # deleting step 0 blocks in the background...
        assert started.wait(10)
        mngr.save(2, {"x": np.int32(2)})  # ...and saves go on
        assert time.perf_counter() - began < 5
        assert mngr.all_steps() == [2]
        release.set()
        mngr.wait_until_finished()
        assert names_in(directory) == ["00000002"]


@pytest.mark.parametrize("surfaced_by", ["save", "wait_until_finished", "check_for_errors",
                                         "close"])
def test_background_deletion_errors_surface_at_the_next_call(
    directory: str, monkeypatch, surfaced_by: str
) -> None:
    fail_trash_deletion(directory, monkeypatch)
    mngr = manager(directory, keep=[policies.KeepLast(1)])
    mngr.save(0, {"x": np.int32(0)})
    assert mngr.save(1, {"x": np.int32(1)})  # commits; deleting step 0 fails in the background
    assert mngr.all_steps() == [1]
    mngr._background.wait()  # noqa: SLF001 - let the failure happen before the next call
    call = {
        "save": lambda: mngr.save(2, {"x": np.int32(2)}),
        "wait_until_finished": mngr.wait_until_finished,
        "check_for_errors": mngr.check_for_errors,
        "close": mngr.close,
    }[surfaced_by]
    with pytest.raises(KeepaxError, match="step 0.*Permission denied") as info:
        call()
    assert info.value.step == 0 and isinstance(info.value.__cause__, PermissionError)
    mngr.check_for_errors()  # raised once, not again
    monkeypatch.undo()
    mngr.close()
    assert mngr.all_steps() == [1]


def test_failure_to_hide_a_step_keeps_it_and_surfaces(directory: str, monkeypatch) -> None:
    cls = storage_class(directory)
    original = cls.rename_dir

    def failing_rename(self: object, source: str, target: str, **kw: object) -> None:
        if ".keepax-trash-" in target:
            raise OSError(5, "I/O error")
        original(self, source, target, **kw)

    monkeypatch.setattr(cls, "rename_dir", failing_rename)
    with manager(directory, keep=[policies.KeepLast(1)]) as mngr:
        mngr.save(0, {"x": np.int32(0)})
        assert mngr.save(1, {"x": np.int32(1)})
        assert mngr.all_steps() == [0, 1]  # still held, since still there
        with pytest.raises(KeepaxError, match="deleting step 0 failed.*still held"):
            mngr.check_for_errors()
        with pytest.raises(KeepaxError, match="I/O error"):
            mngr.delete(0)  # a direct delete raises at once
        monkeypatch.undo()
        mngr.save(2, {"x": np.int32(2)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2]


# ---------------------------------------------------------------------------------------------
# Existing steps, older steps.


def test_existing_step_is_skipped_refused_with_force_or_overwritten(directory: str) -> None:
    with manager(directory) as mngr:
        assert mngr.save(1, {"x": np.int32(1)})
        assert not mngr.should_save(1)
        assert not mngr.save(1, {"x": np.int32(2)})  # already saved
        with pytest.raises(CheckpointExistsError, match="overwrite=True") as info:
            mngr.save(1, {"x": np.int32(2)}, force=True)
        assert info.value.step == 1 and info.value.path.endswith("00000001")
        assert mngr.save(1, {"x": np.int32(3)}, overwrite=True)
        assert int(mngr.restore(1)["x"]) == 3
        assert names_in(directory) == ["00000001"]


def test_overwrite_under_a_new_name_removes_the_old_one(directory: str) -> None:
    with manager(directory, template="e{epoch}_{step}") as mngr:
        mngr.save(1, {"x": np.int32(1)}, epoch=1)
        mngr.save(1, {"x": np.int32(2)}, epoch=2, overwrite=True)
        mngr.wait_until_finished()
        assert names_in(directory) == ["e2_1"] and mngr.metadata(1).name == "e2_1"


def test_lower_step_is_refused_naming_discard_newer(directory: str) -> None:
    with manager(directory) as mngr:
        _save_steps(mngr, range(5))
        assert_tree_equal(mngr.restore(2), {"x": np.int32(2)})  # restoring alone is fine
        for step in (3, 2):  # held or not: going on below the latest is refused
            with pytest.raises(StepOrderError,
                               match=r"below the latest step 4.*discard_newer=True") as info:
                mngr.save(step, {"x": np.int32(3)}, force=step == 2)
            assert isinstance(info.value, ValueError)  # what callers caught before
            assert (info.value.step, info.value.path) == (step, directory)
        assert mngr.save(1, {"x": np.int32(11)}, overwrite=True)  # replacing one is fine
        mngr.restore(2, discard_newer=True)
        assert mngr.all_steps() == [0, 1, 2]
        assert mngr.save(3, {"x": np.int32(33)})
        mngr.wait_until_finished()
    with manager(directory) as again:
        assert again.all_steps() == [0, 1, 2, 3]
        assert int(again.restore()["x"]) == 33


def test_discard_newer_as_a_manager_option(directory: str) -> None:
    with manager(directory, discard_newer=True) as mngr:
        _save_steps(mngr, range(4))
        mngr.restore(1)
        assert mngr.all_steps() == [0, 1]
        mngr.save(2, {"x": np.int32(2)})
        assert mngr.all_steps() == [0, 1, 2]
    with manager(directory, read_only=True) as reader:
        with pytest.raises(KeepaxError, match="read_only"):
            reader.restore(0, discard_newer=True)
        assert reader.all_steps() == [0, 1, 2]


def test_missing_step_lists_the_available_ones(directory: str) -> None:
    with manager(directory, best=("loss", "min")) as mngr:
        with pytest.raises(CheckpointNotFoundError, match="no steps saved here yet"):
            mngr.restore()
        _save_steps(mngr, range(3))
        for call in (lambda: mngr.restore(7), lambda: mngr.metrics(7),
                     lambda: mngr.metadata(7)):
            with pytest.raises(CheckpointNotFoundError,
                               match="step 7 does not exist; the available steps are: 0, 1, 2"):
                call()
        with pytest.raises(CheckpointNotFoundError, match="no step has the metric 'loss'"):
            mngr.restore("best")
        with pytest.raises(KeepaxError, match="'best'"):
            mngr.restore("newest")


def test_many_available_steps_are_summarised(directory: str) -> None:
    with manager(directory) as mngr:
        _save_steps(mngr, range(22))
        with pytest.raises(CheckpointNotFoundError, match=r"0, 1, .*7, \.\.\., 14, .*21$"):
            mngr.restore(99)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_policy": "every 100"}, "not a save policy"),
        ({"save_policy": 100}, "not a save policy"),
        ({"keep": [object()]}, "not a keep policy"),
        ({"keep": policies.KeepLast(2)}, None),  # a single policy is accepted
        ({"keep": "last 3"}, "keep must be a list"),
        ({"best": ("loss", "median")}, "best must be"),
        ({"best": ("", "min")}, "best must be"),
        ({"template": "ckpt"}, "no {step}"),
        ({"template": "{step}/{epoch}"}, "'/'"),
        ({"staging_grace": -1}, "staging_grace"),
        ({"read_only": True, "preemption": True}, "read_only"),
        ({}, None),
    ],
)
def test_invalid_options_are_refused_at_construction(tmp_path, kwargs: dict, match: str | None
                                                     ) -> None:
    if match is None:
        keepax.CheckpointManager(str(tmp_path / "ok"), **kwargs).close()
        return
    with pytest.raises(PolicyError, match=match):
        keepax.CheckpointManager(str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()  # nothing created


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: policies.EveryNSteps(0), "at least 1"),
        (lambda: policies.Stages([(100, 1000), (10, 500)]), "strictly increase"),
        (lambda: policies.Stages([(100, None), (10, 500)]), "not the last stage"),
        (lambda: policies.OnEvents(["epoch_finish"]), "unknown event"),
        (lambda: policies.KeepBest(2, ""), "non-empty metric"),
        (lambda: policies.KeepBest(2, None), "non-empty metric"),  # best-N without a metric
    ],
)
def test_invalid_policies_are_refused(build: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        build()


def test_unknown_and_missing_placeholders(directory: str) -> None:
    with manager(directory, template="e{epoch}_{step}") as mngr:
        with pytest.raises(PolicyError, match="missing placeholder.*epoch"):
            mngr.save(1, {"x": np.int32(1)})
        with pytest.raises(PolicyError, match="unknown placeholder.*phase"):
            mngr.save(1, {"x": np.int32(1)}, epoch=1, phase="a")
        with pytest.raises(PolicyError, match="step directory name 'ea/b_1'"):
            mngr.save(1, {"x": np.int32(1)}, epoch="a/b")
        assert mngr.all_steps() == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", True, None, [1.0],
                                   np.float32("nan"), np.bool_(True)])
def test_metrics_must_be_finite_real_numbers(directory: str, value: object) -> None:
    with manager(directory) as mngr:
        with pytest.raises(KeepaxError, match="metric 'loss'.*finite real numbers") as info:
            mngr.save(1, {"x": np.int32(1)}, metrics={"loss": value})
        assert info.value.step == 1
        assert mngr.all_steps() == []


def test_metrics_accept_numpy_and_jax_scalars(directory: str) -> None:
    with manager(directory) as mngr:
        mngr.save(1, {"x": np.int32(1)}, metrics={"a": np.float32(0.5), "b": jnp.array(2.0),
                                                     "c": 3, "d": jnp.bfloat16(1.5)})
        assert mngr.metrics(1) == {"a": 0.5, "b": 2.0, "c": 3.0, "d": 1.5}
        with pytest.raises(KeepaxError, match="metric names must be str"):
            mngr.save(2, {"x": np.int32(1)}, metrics={1: 0.5})


def test_bad_steps_and_metadata(directory: str) -> None:
    with manager(directory) as mngr:
        for step in (-1, 1.5, "3", True):
            with pytest.raises(PolicyError, match="non-negative int"):
                mngr.save(step, {"x": np.int32(1)})
        with pytest.raises(KeepaxError, match="not JSON-serialisable") as info:
            mngr.save(1, {"x": np.int32(1)}, metadata={"a": np.ones(2)})
        assert info.value.step == 1
        assert mngr.save(np.int64(2), {"x": np.int32(1)}) and mngr.all_steps() == [2]


def test_best_step_needs_a_metric(directory: str) -> None:
    with manager(directory) as mngr:
        _save_steps(mngr, range(2), {0: 1.0, 1: 2.0})
        with pytest.raises(PolicyError, match="best=\\('loss', 'min'\\)"):
            mngr.best_step()
    with manager(directory, best=("loss", "max")) as mngr:
        assert mngr.best_step() == 1
    with manager(directory, keep=[policies.KeepBest(1, "loss")]) as mngr:
        assert mngr.best_step() == 0


def test_second_manager_on_the_same_directory_is_refused(directory: str) -> None:
    first = manager(directory)
    first.save(1, {"x": np.int32(1)})
    with pytest.raises(DirectoryLockedError) as info:
        manager(directory)
    assert info.value.path == directory
    message = str(info.value)
    assert f"host {socket.gethostname()}" in message and f"PID {os.getpid()}" in message
    assert "read_only=True" in message
    with manager(directory, read_only=True) as reader:  # inspection needs no lock
        assert reader.all_steps() == [1]
        assert_tree_equal(reader.restore(1), {"x": np.int32(1)})
        for call in (lambda: reader.save(2, {"x": np.int32(2)}), lambda: reader.delete(1),
                     lambda: reader.event("epoch_end", 2, {})):
            with pytest.raises(KeepaxError, match="read_only=True"):
                call()
    first.close()
    manager(directory).close()


def test_foreign_entries_and_corrupt_steps_are_skipped_and_never_deleted(
    directory: str,
) -> None:
    with manager(directory) as mngr:
        _save_steps(mngr, range(3))
    storage = open_root(directory)
    storage.write_bytes("notes.txt", b"hello")
    storage.write_bytes("foreign/file.bin", b"\x00" * 10)
    keepax.save(f"{directory}/plain", {"x": np.ones(2)})  # not written by a manager
    storage.delete("00000001/manifest.json")  # corrupt step 1
    storage.write_bytes("00000001/manifest.json", b"{garbage")
    storage.delete("00000002/keepax.commit")  # step 2 never committed
    with pytest.warns(KeepaxWarning) as caught:
        mngr = manager(directory, keep=[policies.KeepLast(1)])
    text = "\n".join(str(w.message) for w in caught)
    for name in ("notes.txt", "foreign", "plain", "00000001", "00000002"):
        assert f"/{name}: not a step of this manager, skipped and left alone" in text
    assert "not written by a CheckpointManager" in text
    with mngr:
        assert mngr.all_steps() == [0]
        _save_steps(mngr, range(3, 6))
        mngr.reload()  # no new warnings for the same entries
        assert mngr.all_steps() == [5]
    assert names_in(directory) == ["00000001", "00000002", "00000005", "foreign", "notes.txt",
                                   "plain"]


def test_a_name_taken_by_a_foreign_entry(directory: str) -> None:
    open_root(directory).write_bytes("00000003", b"not a step")
    with pytest.warns(KeepaxWarning, match="00000003"):
        mngr = manager(directory)
    with mngr:
        with pytest.raises(CheckpointExistsError, match="not one of this manager's steps") as e:
            mngr.save(3, {"x": np.int32(3)})
        assert e.value.step == 3


def test_staging_leftovers_removed_after_a_grace_period(tmp_path) -> None:
    directory = str(tmp_path / "run")
    with manager(directory) as mngr:
        mngr.save(1, {"x": np.int32(1)})
    old = os.path.join(directory, "00000002.keepax-tmp-aaaa")
    young = os.path.join(directory, "00000003.keepax-tmp-bbbb")
    for path in (old, young):
        os.makedirs(os.path.join(path, "data"))
    past = time.time() - 3600
    for path in (os.path.join(old, "data"), old):
        os.utime(path, (past, past))
    with manager(directory, staging_grace=600) as mngr:
        assert mngr.all_steps() == [1]
    assert sorted(os.listdir(directory)) == ["00000001", "00000003.keepax-tmp-bbbb"]
    with manager(directory, read_only=True):
        pass  # read-only managers remove nothing
    with manager(directory, staging_grace=0):
        pass
    assert sorted(os.listdir(directory)) == ["00000001"]


def test_read_only_on_a_missing_directory(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        keepax.CheckpointManager(str(tmp_path / "missing"), read_only=True)


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_config_round_trip(directory: str) -> None:
    save_policy = policies.AnyOf(policies.Stages.parse("every 100 until 1000, then every 1000"),
                                 policies.EveryInterval(600), policies.OnEvents(["epoch_end"], 2))
    keep = [policies.KeepLast(3), policies.KeepEvery(10_000),
            policies.KeepBest(2, "loss", mode="min")]
    mngr = keepax.CheckpointManager(directory, save_policy=save_policy, keep=keep,
                                    best=("accuracy", "max"), template="e{epoch}_{step:06d}",
                                    discard_newer=True, staging_grace=30)
    config = mngr.to_config()
    mngr.close()
    text = json.dumps(config)
    assert config["directory"] == directory
    again = keepax.CheckpointManager.from_config(json.loads(text), clock=FakeClock())
    assert again.to_config() == config
    assert again.best_step() is None
    again.close()
    with keepax.CheckpointManager.from_config(config, read_only=True) as reader:
        assert reader.to_config() == config
    with pytest.raises(PolicyError, match="unknown manager config field"):
        keepax.CheckpointManager.from_config({**config, "max_to_keep": 3})
    with pytest.raises(PolicyError, match="unknown type"):
        keepax.CheckpointManager.from_config({**config, "keep": [{"type": "keep_newest"}]})


def test_config_of_a_custom_policy(directory: str) -> None:
    class Odd:
        def decide(self, step: int, ctx: policies.SaveContext) -> policies.Decision:
            return policies.Decision.PERMANENT if step % 2 else policies.Decision.SKIP

    with manager(directory, save_policy=Odd()) as mngr:
        assert [s for s in range(5) if mngr.save(s, {"x": np.int32(s)})] == [1, 3]
        with pytest.raises(PolicyError, match="no to_config"):
            mngr.to_config()


# ---------------------------------------------------------------------------------------------
# Unfinished multipart uploads of killed S3 saves (moto on loopback).


def _upload_ids(s3) -> set[str]:
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    return {u["UploadId"] for u in uploads}


def test_a_manager_start_aborts_the_uploads_a_killed_save_left(s3) -> None:
    run = f"{s3.url}/run"
    with keepax.CheckpointManager(run, storage_options=s3.options, async_save=False) as mngr:
        mngr.save(1, {"w": np.ones(4, np.float32)})
    client = s3.client()
    # What a save killed mid-file leaves: an upload with a part, never completed.
    dead = client.create_multipart_upload(
        Bucket=s3.bucket, Key="run/00000002/data/p00000-000.safetensors")["UploadId"]
    client.upload_part(Bucket=s3.bucket, Key="run/00000002/data/p00000-000.safetensors",
                       UploadId=dead, PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/p0")["UploadId"]
    with keepax.CheckpointManager(run, storage_options=s3.options, read_only=True) as mngr:
        assert mngr.all_steps() == [1]
    assert _upload_ids(s3) == {dead, other}  # a reader aborts nothing
    # (moto dates every upload 2010-11-10: a grace longer than that keeps it.)
    keepax.CheckpointManager(run, storage_options=s3.options, staging_grace=10**10).close()
    assert _upload_ids(s3) == {dead, other}
    with keepax.CheckpointManager(run, storage_options=s3.options) as mngr:
        assert mngr.all_steps() == [1]
    assert _upload_ids(s3) == {other}  # only those under the manager's prefix


def test_a_failure_to_list_uploads_is_a_warning(s3) -> None:
    from test_s3 import _FaultProxy  # the loopback fault proxy of the S3 tests

    run = f"{s3.url}/run"
    keepax.CheckpointManager(run, storage_options=s3.options).close()
    proxy = _FaultProxy(s3.endpoint, lambda n, method, path: 403 if "uploads" in path else None)
    try:
        with pytest.warns(keepax.KeepaxWarning, match="could not abort the unfinished uploads"):
            with keepax.CheckpointManager(run, storage_options=proxy.options()) as mngr:
                mngr.save(1, {"w": np.ones(2)})
    finally:
        proxy.close()
    with keepax.CheckpointManager(run, storage_options=s3.options, read_only=True) as mngr:
        assert mngr.all_steps() == [1]
