"""The manager as Orbax, CLU and eformer users drive it: ``should_save`` before building a
state, commit callbacks, run-level metadata, time-based retention, time-based temporaries that
count from the manager's start, and ``dtype=`` on save."""

from __future__ import annotations

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faulty_storage import Faults
from jax.sharding import NamedSharding, PartitionSpec
from test_manager import FakeClock, manager, names_in

import keepax
from keepax import policies
from keepax._src.checkpoint import casting
from keepax._src.io import open_root
from keepax.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    KeepaxError,
    KeepaxWarning,
    PolicyError,
    StepOrderError,
)


class Position:
    """A data iterator whose state holds a float array (never cast)."""

    def __init__(self) -> None:
        self.weights = np.linspace(0, 1, 4, dtype=np.float32)

    def get_state(self) -> dict[str, object]:
        return {"weights": self.weights}

    def set_state(self, state: dict[str, object]) -> None:
        self.weights = np.asarray(state["weights"])


# ---------------------------------------------------------------------------------------------
# should_save: skip building the state.


def test_should_save_guards_building_an_expensive_state(directory: str) -> None:
    built = []

    def build(step: int) -> dict[str, np.ndarray]:
        built.append(step)
        return {"x": np.full(3, step, np.float32)}

    with manager(directory, save_policy=policies.EveryNSteps(5)) as mngr:
        for step in range(12):
            if mngr.should_save(step):  # the Orbax loop
                assert mngr.save(step, build(step))
        assert built == [0, 5, 10] == mngr.all_steps()
    with manager(directory, save_policy=policies.EveryNSteps(5)) as again:
        # At or below the latest step (10) nothing would be written: save would raise below
        # it and skip it at it.
        assert [s for s in range(16) if again.should_save(s)] == [15]
        assert not again.should_save(5) and not again.should_save(10)
        with pytest.raises(StepOrderError):
            again.save(5, build(5))
        assert not again.save(10, build(10))


def test_should_save_agrees_with_save_for_a_temporary_made_permanent(directory: str) -> None:
    clock = FakeClock(0.0)
    policy = policies.AnyOf(policies.AtSteps([4]), policies.EveryInterval(10))
    with manager(directory, save_policy=policy, clock=clock) as mngr:
        clock.now = 20.0
        assert mngr.should_save(3) and mngr.save(3, {"x": np.int32(3)})
        assert mngr.metadata(3).temporary
        assert not mngr.should_save(3)  # a temporary at 3 again: skipped
        assert mngr.should_save(4)  # AtSteps makes 4 permanent
        assert not mngr.should_save(2)


def test_should_save_for_lifecycle_events_counts_nothing(directory: str) -> None:
    policy = policies.OnEvents(["epoch_end"], every_n=2)
    with manager(directory, save_policy=policy) as mngr:
        outcomes = []
        for epoch in range(1, 7):
            step = 100 * epoch
            predicted = mngr.should_save(step, event="epoch_end")
            assert predicted == mngr.should_save(step, event="epoch_end")  # asking twice
            assert not mngr.should_save(step)  # a plain save would not write
            outcomes.append((predicted, mngr.event("epoch_end", step, {"x": np.int32(step)})))
        assert outcomes == [(False, False), (True, True)] * 3
        assert mngr.all_steps() == [200, 400, 600]
        with pytest.raises(PolicyError, match="unknown event 'epoch_ends'"):
            mngr.should_save(700, event="epoch_ends")


# ---------------------------------------------------------------------------------------------
# on_commit: eformer's commit_callback.


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_on_commit_runs_once_the_step_is_durable(directory: str, async_save: bool) -> None:
    calls: list[tuple[int, object, list[str]]] = []

    def on_commit(step: int, error: Exception | None) -> None:
        # Durable: a fresh reader opens the committed step.
        restored = keepax.restore(f"{directory}/{step:08d}")
        calls.append((step, error, [f"{float(restored['w'][0]):g}", threading.current_thread()
                                    .name.split("-")[0]]))

    with manager(directory, save_policy=policies.EveryNSteps(10),
                 async_save=async_save) as mngr:
        for step in range(25):
            wrote = mngr.save(step, {"w": np.full(2, step, np.float32)}, on_commit=on_commit)
            if not async_save and wrote:
                assert calls[-1][0] == step  # before save returned
        mngr.wait_until_finished()
    thread = "keepax" if async_save else "MainThread"
    assert calls == [(0, None, ["0", thread]), (10, None, ["10", thread]),
                     (20, None, ["20", thread])]


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_on_commit_hears_of_a_failed_save(directory: str, async_save: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, Exception | None]] = []
    with manager(directory, async_save=async_save) as mngr:
        mngr.save(0, {"w": np.zeros(4, np.float32)}, on_commit=lambda s, e: calls.append((s, e)))
        mngr.wait_until_finished()
        faults = Faults(fail_write_after=0).install(monkeypatch, type(open_root(directory)))
        # The error the manager raises for it: the OSError itself (sync), or a KeepaxError
        # naming the step (async, raised by the next call).
        with pytest.raises((OSError, KeepaxError), match="No space left") as raised:
            mngr.save(1, {"w": np.ones(4, np.float32)},
                      on_commit=lambda s, e: calls.append((s, e)))
            mngr.wait_until_finished()  # async: the background failure is raised here
        assert faults.creates >= 1
        assert [s for s, _ in calls] == [0, 1] and calls[0][1] is None
        assert calls[1][1] is raised.value
        monkeypatch.undo()
        assert mngr.all_steps() == [0]


def test_on_commit_hears_of_a_save_refused_at_once(directory: str) -> None:
    open_root(directory).write_bytes("00000003/notes.txt", b"not a step")
    calls: list[tuple[int, Exception | None]] = []
    with pytest.warns(KeepaxWarning, match="not a step"):
        mngr = manager(directory)
    with mngr, pytest.raises(CheckpointExistsError, match="taken by an entry"):
        mngr.save(3, {"x": np.int32(3)}, on_commit=lambda s, e: calls.append((s, e)))
    assert len(calls) == 1 and calls[0][0] == 3
    assert isinstance(calls[0][1], CheckpointExistsError)


def test_on_commit_is_not_called_for_skipped_saves_and_its_errors_surface(
    directory: str,
) -> None:
    calls: list[int] = []

    def broken(step: int, error: Exception | None) -> None:
        calls.append(step)
        raise RuntimeError("the notification service is down")

    mngr = manager(directory, save_policy=policies.EveryNSteps(2))
    assert not mngr.save(1, {"x": np.int32(1)}, on_commit=broken)
    assert mngr.save(2, {"x": np.int32(2)}, on_commit=broken)
    with pytest.raises(KeepaxError, match="on_commit callback raised RuntimeError") as info:
        mngr.wait_until_finished()
    assert info.value.step == 2 and "committed all the same" in str(info.value)
    assert calls == [2] and mngr.all_steps() == [2]
    with pytest.raises(KeepaxError, match="on_commit must be a callable"):
        mngr.save(4, {"x": np.int32(4)}, on_commit="print")
    mngr.close()


# ---------------------------------------------------------------------------------------------
# Run-level metadata: Orbax's CheckpointManager(metadata=...) and metadata().


def test_run_metadata_is_kept_with_the_directory(directory: str) -> None:
    meta = {"version": 1.1, "lang": "en", "config": {"lr": 3e-4, "layers": [4, 4]}}
    with manager(directory, metadata=meta, keep=[policies.KeepLast(1)]) as mngr:
        assert mngr.run_metadata() == meta
        for step in range(3):
            mngr.save(step, {"x": np.int32(step)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2]  # retention never touches the metadata file
    assert sorted(names_in(directory)) == ["00000002", "keepax-run.json"]
    # Reopened without metadata (no warning about a foreign entry), and read only.
    with manager(directory) as again:
        assert again.run_metadata() == meta and again.all_steps() == [2]
        again.run_metadata()["lang"] = "fr"  # a copy
        assert again.run_metadata() == meta
    with keepax.CheckpointManager(directory, read_only=True) as reader:
        assert reader.run_metadata() == meta
    stored = json.loads(open_root(directory).read_bytes("keepax-run.json"))
    assert stored == {"format": "keepax-run", "version": 1, "metadata": meta}


def test_different_run_metadata_replaces_the_stored_one_with_a_warning(directory: str) -> None:
    with manager(directory, metadata={"lr": 0.1, "seed": 0}) as mngr:
        mngr.save(0, {"x": np.int32(0)})
    with manager(directory, metadata={"lr": 0.1, "seed": 0}) as same:  # no warning
        assert same.run_metadata() == {"lr": 0.1, "seed": 0}
    with pytest.warns(KeepaxWarning, match=r"differs from the stored one \(keys 'lr', 'note'"):
        changed = manager(directory, metadata={"lr": 0.05, "seed": 0, "note": "resumed"})
    with changed:
        assert changed.run_metadata() == {"lr": 0.05, "seed": 0, "note": "resumed"}
        assert changed.all_steps() == [0]
    assert [n for n in open_root(directory).list("") if "keepax-run" in n] == ["keepax-run.json"]


def test_run_metadata_without_any_and_bad_input(directory: str, tmp_path) -> None:
    with manager(directory) as mngr:
        assert mngr.run_metadata() == {}
    with pytest.raises(KeepaxError, match="not JSON-serialisable"):
        manager(directory, metadata={"when": object()})
    with pytest.raises(PolicyError, match="metadata must be a JSON-able dict"):
        manager(directory, metadata=[1, 2])
    with pytest.raises(PolicyError, match="drop read_only=True"):
        manager(directory, metadata={"a": 1}, read_only=True)
    open_root(directory).write_bytes("keepax-run.json", b"{not json")
    with manager(directory) as mngr:
        with pytest.raises(CorruptCheckpointError, match="keepax-run.json.*not JSON"):
            mngr.run_metadata()
    with pytest.warns(KeepaxWarning, match="it is replaced"):
        fixed = manager(directory, metadata={"a": 1})
    with fixed:
        assert fixed.run_metadata() == {"a": 1}


# ---------------------------------------------------------------------------------------------
# Time-based retention: Orbax's keep_time_interval.


def test_keep_one_step_per_hour_forever_beside_the_last_two(directory: str) -> None:
    clock = FakeClock(0.0)
    keep = [policies.KeepLast(2), policies.KeepTimeInterval(3600)]
    with manager(directory, keep=keep, clock=clock) as mngr:
        for step in range(19):  # one save every 10 minutes, three hours
            clock.now = 600.0 * step
            mngr.save(step, {"x": np.int32(step)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [0, 6, 12, 17, 18]
        assert mngr.plan_deletions().reasons[6] == "one per 3600s"
    with manager(directory, keep=keep, clock=clock) as again:  # after a restart too
        clock.now = 600.0 * 19
        again.save(19, {"x": np.int32(19)})
        again.wait_until_finished()
        assert again.all_steps() == [0, 6, 12, 18, 19]


# ---------------------------------------------------------------------------------------------
# Time-based temporaries: counting from this manager's start; a previous run's temporary.


def test_interval_from_the_manager_start_writes_no_temporary_at_a_restart(
    directory: str,
) -> None:
    clock = FakeClock(0.0)
    eformer = policies.AnyOf(policies.EveryNSteps(100),
                             policies.EveryInterval(60, since="start"))
    with manager(directory, save_policy=eformer, clock=clock) as mngr:
        clock.now = 70.0
        assert mngr.save(7, {"x": np.int32(7)}) and mngr.metadata(7).temporary
    clock.now = 5000.0  # back after downtime
    default = policies.AnyOf(policies.EveryNSteps(100), policies.EveryInterval(60))
    with manager(directory, save_policy=default, clock=clock, read_only=True) as reader:
        assert reader.should_save(8)  # today's default: at once
    with manager(directory, save_policy=eformer, clock=clock) as again:
        assert not again.should_save(8) and not again.save(8, {"x": np.int32(8)})
        clock.now = 5059.0
        assert not again.save(9, {"x": np.int32(9)})
        clock.now = 5060.0
        assert again.save(10, {"x": np.int32(10)})  # one interval after the start
        clock.now = 5100.0
        assert not again.save(11, {"x": np.int32(11)})  # 40 s after its own save
        again.wait_until_finished()
        assert again.all_steps() == [10]  # the previous temporary went as usual


def test_keep_the_temporary_a_previous_run_left(directory: str) -> None:
    clock = FakeClock(0.0)
    policy = policies.AnyOf(policies.EveryNSteps(100), policies.EveryInterval(60))
    with manager(directory, save_policy=policy, clock=clock) as mngr:
        assert mngr.save(0, {"x": np.int32(0)})
        clock.now = 70.0
        assert mngr.save(7, {"x": np.int32(7)}) and mngr.metadata(7).temporary
    clock.now = 100.0
    with manager(directory, save_policy=policy, clock=clock,
                 keep_previous_temporary=True) as again:
        clock.now = 131.0
        assert again.save(9, {"x": np.int32(9)}) and again.metadata(9).temporary
        assert again.save(100, {"x": np.int32(100)})
        again.wait_until_finished()
        # 7 is kept (as a permanent step); 9, this run's temporary, went as usual.
        assert again.all_steps() == [0, 7, 100]
        assert again.to_config()["keep_previous_temporary"] is True
    with manager(directory, save_policy=policy, clock=clock, keep=[policies.KeepLast(1)],
                 keep_previous_temporary=True) as third:
        # Kept like a permanent step: the keep policies decide about it.
        assert third.plan_deletions().delete == (0, 7)


# ---------------------------------------------------------------------------------------------
# dtype= on save: eformer's cast of floating-point leaves.


def test_save_with_dtype_casts_floating_leaves_only(directory: str) -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = jax.device_put(jnp.arange(8, dtype=jnp.float32), NamedSharding(mesh,
                                                                            PartitionSpec("x")))
    state = {
        "params": {"w": jnp.ones((3, 2), jnp.float32), "sharded": sharded,
                   "host": np.full(3, 0.1, np.float64)},
        "opt_state": {"count": jnp.int32(7), "mask": np.array([True, False]),
                      "scale": np.float32(0.5)},
        "lr": 0.001,
        "data_iter": Position(),
    }
    with manager(directory) as mngr:
        assert mngr.save(0, state, dtype=jnp.bfloat16)
        info = mngr.item_metadata(0)
        restored = mngr.restore(0)
    dtypes = {keepax_path: leaf.dtype for keepax_path, leaf in
              jax.tree_util.tree_flatten_with_path(info, is_leaf=lambda x: isinstance(
                  x, keepax.LeafInfo))[0]}
    named = {jax.tree_util.keystr(k): v for k, v in dtypes.items()}
    assert named["['params']['w']"] == named["['params']['sharded']"] == "bfloat16"
    assert named["['params']['host']"] == named["['opt_state']['scale']"] == "bfloat16"
    assert named["['opt_state']['count']"] == "int32"
    assert named["['opt_state']['mask']"] == "bool"
    assert named["['data_iter']['weights']"] == "float32"  # iterator state: never cast
    assert restored["lr"] == 0.001 and isinstance(restored["lr"], float)
    np.testing.assert_array_equal(restored["params"]["sharded"],
                                  np.arange(8, dtype=jnp.bfloat16))
    # The caller's state is untouched.
    assert state["params"]["w"].dtype == jnp.float32 and sharded.dtype == jnp.float32


def test_save_with_a_dtype_that_is_not_floating_is_refused(directory: str) -> None:
    for reserved in ("dtype", "on_commit"):
        with pytest.raises(PolicyError, match=reserved):
            manager(directory, template=f"{{step}}_{{{reserved}}}")
    with manager(directory, save_policy=policies.EveryNSteps(10)) as mngr:
        with pytest.raises(KeepaxError, match="not a floating-point dtype"):
            mngr.save(1, {"x": np.ones(2, np.float32)}, dtype=jnp.int8)  # even when skipped
        with pytest.raises(KeepaxError, match="is not a dtype"):
            mngr.save(0, {"x": np.ones(2, np.float32)}, dtype="bfloat17")
        assert mngr.all_steps() == []


def test_cast_floating_keeps_sharding_and_leaves_others_alone() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    x = jax.device_put(jnp.ones(4, jnp.float32), sharding)
    key = jax.random.key(0)
    tree = {"x": x, "i": np.arange(3), "c": np.ones(2, np.complex64), "key": key, "s": "text",
            "f": 1.5, "h": np.ones(2, np.float16)}
    out = casting.cast_floating(tree, "float8_e4m3fn")
    assert out["x"].dtype == jnp.float8_e4m3fn and out["x"].sharding == sharding
    assert out["h"].dtype == jnp.float8_e4m3fn
    for name in ("i", "c", "key", "s", "f"):
        assert out[name] is tree[name]
    assert casting.cast_floating(tree, None) is tree
    same = casting.cast_floating({"b": np.ones(2, jnp.bfloat16)}, jnp.bfloat16)
    assert same["b"].dtype == jnp.bfloat16
