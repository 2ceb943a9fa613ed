"""Asynchronous saves: staging (donate, delete, mutate right after return), bounded in-flight
saves and staging memory, background failures surfacing at every call that must raise them,
retention after commit, records and logs, exit and ``kill -9`` safety.

Writes are held back by a storage-level fault injector (``faulty_storage.Faults(hold=True)``:
data files are created only once it is released), so that what the caller does after ``save``
returns happens before anything is written; the same injector fails chosen storage operations.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faulty_storage import Faults, FaultyStorage

import keepax
from keepax import policies
from keepax._src import async_engine as keepax_async
from keepax._src import checkpoint
from keepax._src.async_engine import api as async_api
from keepax._src.async_engine import staging as async_staging
from keepax._src.format import datafiles as format
from keepax._src.io import LocalStorage, MemoryStorage, Storage, open_root
from keepax.errors import KeepaxError, UnsupportedLeafError

# ---------------------------------------------------------------------------------------------
# Helpers.


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingIterator:
    def __init__(self, position: int = 0) -> None:
        self.position = position

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def storage_class(path: str) -> type[Storage]:
    return type(open_root(path))


def install_gate(monkeypatch: pytest.MonkeyPatch, path: str) -> Faults:
    """Holds every data-file creation under ``path``'s backend until ``.release()``."""
    return Faults(hold=True).install(monkeypatch, storage_class(path))


def install_disk_full(monkeypatch: pytest.MonkeyPatch) -> Faults:
    """Every write raises ENOSPC, as a full disk does (both storage backends)."""
    return Faults(matches=lambda path: True, fail_write_after=0).install(
        monkeypatch, LocalStorage, MemoryStorage)


def wait_until_done(handle: keepax.SaveHandle, seconds: float = 30) -> None:
    """Waits for a save to finish without raising its failure; fails the test after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while not handle.done():
        if time.monotonic() > deadline:
            pytest.fail(f"{handle!r} did not finish within {seconds}s")
        time.sleep(0.01)


def manager(directory: str, **kwargs: Any) -> keepax.CheckpointManager:
    kwargs.setdefault("clock", FakeClock())
    return keepax.CheckpointManager(directory, **kwargs)


def visible(path: str) -> list[str]:
    return [n for n in open_root(path).list("") if ".keepax-" not in n]


def hidden(path: str) -> list[str]:
    return [n for n in open_root(path).list("") if ".keepax-" in n and "lock" not in n]


def host_copy(tree: Any) -> Any:
    """What a tree holds now, as private NumPy copies (Python values as they are)."""
    def copy(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.array(jax.random.key_data(x), copy=True)
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            return np.array(x, copy=True)
        if isinstance(x, bytearray):
            return bytearray(x)
        return x

    return jax.tree.map(copy, tree)


def assert_bit_exact(got: Any, want: Any) -> None:
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, np.ndarray | np.generic):
            if isinstance(g, jax.Array) and jax.dtypes.issubdtype(g.dtype, jax.dtypes.prng_key):
                g = jax.random.key_data(g)
            g = np.asarray(g)
            assert (g.dtype, g.shape) == (w.dtype, w.shape)
            assert g.tobytes() == w.tobytes()
        else:
            assert type(g) is type(w) and g == w


@pytest.fixture(autouse=True)
def no_failure_left_unseen() -> Any:
    """Every test leaves keepax.save_async's shared engine idle, with no failure unseen."""
    yield
    engine = async_api.default_engine(create=False)
    if engine is not None:
        engine.wait()
        engine.check_errors()


@pytest.fixture(params=["view", "device", "host", "pinned_host"])
def staging(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way CPU jax.Arrays can be staged (the default is "view"; "pinned_host" is the
    accelerators' way, which CPU JAX offers too)."""
    monkeypatch.setattr(async_staging, "_CPU_STAGING", request.param)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays above 64 KiB are written as several chunks (as arrays above 64 MiB are)."""
    monkeypatch.setattr(format, "CHUNK_BYTES", 64 << 10)


def mixed_tree() -> dict[str, Any]:
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "big": jnp.arange(200_000, dtype=jnp.float32).reshape(400, 500) * 0.5,  # 800 KB
        "sharded": jax.device_put(jnp.arange(64 * 300, dtype=jnp.int32).reshape(64, 300),
                                  sharded),
        "replicated": jax.device_put(jnp.linspace(0, 1, 1000, dtype=jnp.bfloat16), replicated),
        "key": jax.random.key(7),
        "scalar": jnp.float32(3.5),
        "host": np.arange(50_000, dtype=np.float64),
        "strided": np.arange(600, dtype=np.int16).reshape(20, 30)[:, ::2],
        "npscalar": np.int64(-5),
        "blob": bytearray(b"payload"),
        "python": {"lr": 0.1, "name": "run", "n": 3, "flags": [True, None]},
    }


def clobber(tree: dict[str, Any]) -> None:
    """After a save returns: donate or delete every jax.Array, mutate every NumPy buffer and
    container, and allocate to reuse the freed memory."""
    wipe = jax.jit(lambda x: x * 0 - 1, donate_argnums=0)
    for name in ("big", "sharded", "scalar"):
        tree[name] = wipe(tree[name])
    tree["replicated"].delete()
    tree["key"] = jax.random.key(99)
    tree["host"][:] = -1
    tree["strided"].base[:] = 9
    tree["blob"][:] = b"XXXXXXX"
    tree["python"]["lr"] = 7.0
    tree["python"]["flags"].append("extra")
    garbage = [jnp.full((400, 500), 5.0) for _ in range(4)]
    jax.block_until_ready(garbage)


# ---------------------------------------------------------------------------------------------
# keepax.save_async: staging and handles.


def test_save_async_returns_staged_then_commits(root: str) -> None:
    tree = {"w": jnp.arange(1000, dtype=jnp.float32), "n": np.ones(10), "s": "x"}
    handle = keepax.save_async(f"{root}/ckpt", tree, metadata={"note": "hi"})
    assert isinstance(handle, keepax.SaveHandle) and handle.staged
    record = handle.wait(timeout=30)
    assert handle.done() and handle.committed and "committed" in repr(handle)
    assert isinstance(record, keepax.SaveRecord) and record is handle.record
    assert record.committed and record.step is None and record.error is None
    assert record.staging_bytes == 1000 * 4 + 10 * 8
    assert record.bytes_written and record.bytes_written > record.staging_bytes
    assert record.throughput and record.throughput > 0
    assert 0 <= record.blocking_seconds < 30 and record.write_seconds is not None
    assert_bit_exact(keepax.restore(f"{root}/ckpt"), host_copy(tree))
    assert keepax.inspect(f"{root}/ckpt").metadata == {"note": "hi"}


def test_donate_delete_and_mutate_right_after_return(
    root: str, monkeypatch: pytest.MonkeyPatch, staging: str, small_chunks: None
) -> None:
    gate = install_gate(monkeypatch, root)
    tree = mixed_tree()
    want = host_copy(tree)
    handle = keepax.save_async(f"{root}/ckpt", tree)
    assert handle.staged and not handle.done()  # nothing written yet: the gate is closed
    clobber(tree)
    assert tree["replicated"].is_deleted()
    gate.release()
    handle.wait(timeout=30)
    got = keepax.restore(f"{root}/ckpt")
    got["blob"] = bytearray(got["blob"])
    assert_bit_exact(got, want)
    like = mixed_tree()  # fresh arrays as the like tree
    like["blob"] = b""
    back = keepax.restore(f"{root}/ckpt", like)
    assert back["sharded"].sharding == like["sharded"].sharding
    assert_bit_exact(np.asarray(back["big"]), want["big"])


def test_donation_of_a_state_still_being_computed(root: str, staging: str) -> None:
    """save right after dispatching a step (async dispatch), then donate the result."""
    step = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x, donate_argnums=())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(600, 600)).astype(np.float32))
    y = step(x)  # maybe not computed yet
    handle = keepax.save_async(f"{root}/ckpt", {"y": y})
    want = np.asarray(step(x))
    jax.jit(lambda a: a * 0, donate_argnums=0)(y)
    handle.wait(timeout=30)
    assert keepax.restore(f"{root}/ckpt")["y"].tobytes() == want.tobytes()


def test_deleted_array_is_refused_at_the_call(root: str) -> None:
    x = jnp.ones(3)
    x.delete()
    with pytest.raises(UnsupportedLeafError, match="deleted"):
        keepax.save_async(f"{root}/ckpt", {"x": x})
    assert visible(root) == []


def test_existing_checkpoint_is_refused_at_the_call(root: str) -> None:
    keepax.save(f"{root}/ckpt", {"x": np.int32(1)})
    with pytest.raises(keepax.errors.CheckpointExistsError):
        keepax.save_async(f"{root}/ckpt", {"x": np.int32(2)})
    keepax.save_async(f"{root}/ckpt", {"x": np.int32(2)}, overwrite=True).wait()
    assert int(keepax.restore(f"{root}/ckpt")["x"]) == 2


def test_invalid_limits(root: str) -> None:
    for kwargs in ({"max_in_flight": 0}, {"max_in_flight": True},
                   {"staging_budget_bytes": -1}, {"staging_budget_bytes": 1.5}):
        with pytest.raises(ValueError):
            keepax.save_async(f"{root}/ckpt", {}, **kwargs)
    with pytest.raises(keepax.errors.PolicyError, match="max_in_flight"):
        keepax.CheckpointManager(f"{root}/run", max_in_flight=0)
    with pytest.raises(keepax.errors.PolicyError, match="async_save"):
        keepax.CheckpointManager(f"{root}/run", async_save="yes")


# ---------------------------------------------------------------------------------------------
# The manager: async by default, staged state, queries wait.


def test_manager_saves_in_the_background_and_queries_wait(
    root: str, monkeypatch: pytest.MonkeyPatch, staging: str
) -> None:
    gate = install_gate(monkeypatch, root)
    directory = f"{root}/run"
    it = CountingIterator(5)
    state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "opt": np.zeros(4),
             "data": it, "extra": {"lr": 0.5}}
    metadata = {"tags": ["a"]}
    with manager(directory) as mngr:
        began = time.perf_counter()
        assert mngr.save(3, state, metrics={"loss": 1.5}, metadata=metadata)
        assert time.perf_counter() - began < 10  # returned while the write is held back
        assert not mngr.should_save(3)  # held (in flight)
        # Change everything the state holds; the step keeps what it was at the call.
        state["params"]["w"] = jax.jit(lambda w: w * 0, donate_argnums=0)(
            state["params"]["w"])
        state["opt"][:] = 42
        it.position = 99
        state["extra"]["lr"] = 9.9
        metadata["tags"].append("b")
        assert visible(directory) == []  # nothing committed yet
        gate.release()
        assert mngr.all_steps() == [3]  # waits for the save in flight
        assert mngr.metadata(3).metadata == {"tags": ["a"]}
        like = {"params": {"w": jnp.zeros((3, 4))}, "opt": np.ones(4),
                "data": CountingIterator(), "extra": {"lr": 0.0}}
        back = mngr.restore(3, like)
    assert back["data"].position == 5 and back["extra"]["lr"] == 0.5
    np.testing.assert_array_equal(back["params"]["w"], np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(back["opt"], np.zeros(4))


def test_synchronous_manager(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = f"{root}/run"
    with manager(directory, async_save=False) as mngr:
        x = np.arange(5)
        assert mngr.save(1, {"x": x})
        assert visible(directory) == ["00000001"]  # committed before save returned
        record = mngr.save_records[-1]
        assert record.committed and record.staging_bytes == 0 and record.step == 1
        assert record.blocking_seconds >= record.write_seconds
        install_disk_full(monkeypatch)
        with pytest.raises(OSError) as info:  # raised by save itself, as it is
            mngr.save(2, {"x": x})
        assert info.value.errno == errno.ENOSPC
        assert mngr.all_steps() == [1] and hidden(directory) == []
        mngr.check_for_errors()  # nothing left to raise
        assert mngr.to_config()["async_save"] is False


def test_async_options_round_trip_through_config(root: str) -> None:
    directory = f"{root}/run"
    with manager(directory, max_in_flight=2, staging_budget_bytes=1 << 20) as mngr:
        config = mngr.to_config()
    assert (config["async_save"], config["max_in_flight"], config["staging_budget_bytes"]) == (
        True, 2, 1 << 20)
    with keepax.CheckpointManager.from_config(config, clock=FakeClock()) as again:
        assert again.to_config() == config


def test_close_and_context_exit_wait_for_saves_in_flight(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = install_gate(monkeypatch, root)
    directory = f"{root}/run"
    with manager(directory) as mngr:
        mngr.save(1, {"x": jnp.arange(3)})
        threading.Timer(0.3, gate.release).start()
    assert visible(directory) == ["00000001"]
    with manager(directory) as mngr:
        assert mngr.all_steps() == [1]


def test_manager_dropped_unclosed_still_commits(root: str, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    gate = install_gate(monkeypatch, root)
    directory = f"{root}/run"
    mngr = manager(directory)
    mngr.save(1, {"x": np.int32(1)})
    del mngr
    threading.Timer(0.3, gate.release).start()
    with manager(directory) as again:  # waits for the save the dropped manager had in flight
        assert again.all_steps() == [1]


# ---------------------------------------------------------------------------------------------
# Bounded resources.


def test_at_most_max_in_flight_saves_and_the_wait_is_logged(
    root: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keepax")
    gate = install_gate(monkeypatch, root)
    directory = f"{root}/run"
    with manager(directory) as mngr:  # max_in_flight=1
        mngr.save(1, {"x": np.int32(1)})
        assert gate.entered.wait(10)
        second = threading.Thread(target=mngr.save, args=(2, {"x": np.int32(2)}))
        second.start()
        second.join(0.3)
        assert second.is_alive()  # waits for step 1
        gate.release()
        second.join(10)
        assert not second.is_alive()
        assert mngr.all_steps() == [1, 2]
        records = {r.step: r for r in mngr.save_records}
    assert records[2].wait_seconds >= 0.25
    assert records[1].committed and records[1].bytes_written and records[1].throughput
    assert records[1].staging_bytes == 0  # a NumPy scalar: captured, not copied again
    assert records[1].write_seconds is not None
    assert records[2].blocking_seconds >= records[2].wait_seconds
    assert records[1].wait_seconds == 0
    text = caplog.text
    assert "save of step 2 waited" in text and "max_in_flight=1" in text
    assert "saved step 1" in text and "saved step 2" in text


def test_two_in_flight_do_not_wait(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = install_gate(monkeypatch, root)
    directory = f"{root}/run"
    with manager(directory, max_in_flight=2) as mngr:
        mngr.save(1, {"x": np.int32(1)})
        mngr.save(2, {"x": np.int32(2)})  # returns although step 1 is held back
        assert mngr._engine.in_flight == 2  # noqa: SLF001
        assert not mngr.save(2, {"x": np.int32(2)})  # held (in flight): skipped
        with pytest.raises(KeepaxError, match="below the latest step 2"):
            mngr.save(1, {"x": np.int32(0)}, force=True)
        gate.release()
        assert mngr.all_steps() == [1, 2]
        assert [r.wait_seconds for r in mngr.save_records] == [0, 0]


def test_staging_streams_beyond_the_budget(
    root: str, monkeypatch: pytest.MonkeyPatch, staging: str, small_chunks: None
) -> None:
    gate = Faults(hold=True)  # on this save's own storage object (see prepare)
    budget = 1 << 20
    tree = {f"w{i}": jnp.full((256, 512), i, jnp.float32) for i in range(6)}  # 512 KiB each
    tree.update({f"n{i}": np.full(65_536, i, np.float64) for i in range(4)})
    want = host_copy(tree)
    engine = keepax_async.SaveEngine("budget-test")
    handles: list[keepax.SaveHandle] = []

    def prepare() -> checkpoint.PreparedSave:
        prepared = checkpoint.prepare_save(f"{root}/ckpt", tree)
        return dataclasses.replace(prepared, storage=FaultyStorage(prepared.storage, gate))

    save = threading.Thread(target=lambda: handles.append(engine.save(
        prepare, path=f"{root}/ckpt", staging_budget_bytes=budget)))
    save.start()
    save.join(0.3)
    assert save.is_alive()  # 5 MiB cannot be staged in 1 MiB until the writer gets going
    assert engine.budget.used <= budget
    gate.release()
    save.join(30)
    (handle,) = handles
    clobber_all = jax.jit(lambda t: jax.tree.map(lambda x: x * 0, t), donate_argnums=0)
    clobber_all({k: v for k, v in tree.items() if k.startswith("w")})
    for k in tree:
        if k.startswith("n"):
            tree[k][:] = -1
    record = handle.wait(30)
    assert record.budget_wait_seconds > 0.2
    assert record.staging_bytes == 6 * (512 << 10) + 4 * (512 << 10)
    assert engine.budget.peak <= budget and engine.budget.used == 0
    assert_bit_exact(keepax.restore(f"{root}/ckpt"), want)


def test_an_array_larger_than_the_budget_is_staged_alone(root: str) -> None:
    tree = {"a": np.arange(1000, dtype=np.int64), "b": jnp.arange(2000, dtype=jnp.int32)}
    want = host_copy(tree)
    handle = keepax.save_async(f"{root}/ckpt", tree, staging_budget_bytes=100)
    tree["a"][:] = 0
    handle.wait(30)
    assert_bit_exact(keepax.restore(f"{root}/ckpt"), want)


# ---------------------------------------------------------------------------------------------
# Errors are never lost.


def test_background_failure_surfaces_at_handle_wait_and_nothing_is_committed(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_disk_full(monkeypatch)
    handle = keepax.save_async(f"{root}/ckpt", {"w": np.ones(1000)})
    with pytest.raises(KeepaxError, match="nothing was committed.*No space left") as info:
        handle.wait(30)
    assert info.value.path == f"{root}/ckpt"
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert handle.done() and not handle.committed and "failed" in repr(handle)
    assert handle.record is not None and "No space left" in (handle.record.error or "")
    assert visible(root) == [] and hidden(root) == []
    monkeypatch.undo()
    keepax.save_async(f"{root}/other", {"w": np.ones(3)}).wait()  # seen: not raised again


@pytest.mark.parametrize("fault", ["write after 100 KiB", "second file created", "commit rename"])
def test_storage_fault_at_any_stage_commits_nothing_and_surfaces(
    root: str, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    every_file = {"matches": lambda path: True}
    faults = {
        "write after 100 KiB": Faults(fail_write_after=100 << 10),
        "second file created": Faults(**every_file, fail_create_at=2,
                                      fail_create=OSError(errno.EIO, "I/O error")),
        "commit rename": Faults(fail_rename=OSError(errno.EIO, "I/O error")),
    }[fault].install(monkeypatch, storage_class(root))
    handle = keepax.save_async(f"{root}/ckpt", {"w": np.ones(100_000), "b": np.zeros(3)})
    with pytest.raises(KeepaxError, match="nothing was committed") as info:
        handle.wait(30)
    assert isinstance(info.value.__cause__, OSError)
    assert faults.creates >= 1 and not handle.committed
    assert visible(root) == [] and hidden(root) == []
    monkeypatch.undo()
    keepax.save_async(f"{root}/ckpt", {"w": np.ones(3)}).wait(30)  # seen: not raised again
    assert visible(root) == ["ckpt"]


def test_unseen_background_failure_is_raised_by_the_next_save_async(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    denied = PermissionError(errno.EACCES, "Permission denied", "data file")
    Faults(fail_create=denied).install(monkeypatch, storage_class(root))
    first = keepax.save_async(f"{root}/a", {"w": np.ones(10)})
    wait_until_done(first)
    monkeypatch.undo()
    with pytest.raises(KeepaxError, match="Permission denied") as info:
        keepax.save_async(f"{root}/b", {"w": np.ones(10)})
    assert info.value.path == f"{root}/a"
    assert visible(root) == []  # neither a (failed) nor b (not started)
    keepax.save_async(f"{root}/b", {"w": np.ones(10)}).wait()  # raised once
    assert visible(root) == ["b"]


def test_a_bug_in_background_leaf_conversion_surfaces(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = checkpoint.chunk_view

    def broken(array: Any, slices: Any) -> np.ndarray:
        if tuple(array.shape) == (7, 3):
            raise ValueError("cannot convert this leaf")
        return original(array, slices)

    monkeypatch.setattr(checkpoint, "chunk_view", broken)
    directory = f"{root}/run"
    mngr = manager(directory)
    assert mngr.save(4, {"ok": np.ones(5), "bad": jnp.zeros((7, 3))})
    assert mngr.all_steps() == []
    with pytest.raises(KeepaxError, match="step 4.*cannot convert this leaf") as info:
        mngr.close()
    assert info.value.step == 4 and isinstance(info.value.__cause__, ValueError)
    assert visible(directory) == [] and hidden(directory) == []


@pytest.mark.parametrize("surfaced_by", ["save", "wait_until_finished", "check_for_errors",
                                         "close"])
def test_background_failure_surfaces_at_each_manager_call(
    root: str, monkeypatch: pytest.MonkeyPatch, surfaced_by: str
) -> None:
    directory = f"{root}/run"
    mngr = manager(directory, keep=[policies.KeepLast(1)])
    mngr.save(0, {"x": np.arange(4)})
    mngr.wait_until_finished()
    install_disk_full(monkeypatch)
    assert mngr.save(1, {"x": np.arange(4) + 1})  # staged; the write will fail
    assert mngr.all_steps() == [0]  # waits, raises nothing; step 1 never committed
    call = {
        "save": lambda: mngr.save(2, {"x": np.arange(4) + 2}),
        "wait_until_finished": mngr.wait_until_finished,
        "check_for_errors": mngr.check_for_errors,
        "close": mngr.close,
    }[surfaced_by]
    with pytest.raises(KeepaxError, match="step 1.*nothing was committed.*No space") as info:
        call()
    assert info.value.step == 1 and info.value.path.endswith("/00000001")
    assert info.value.__cause__.errno == errno.ENOSPC
    mngr.check_for_errors()  # raised once
    assert visible(directory) == ["00000000"]  # step 0 kept: no newer step was committed
    assert hidden(directory) == []
    monkeypatch.undo()
    if surfaced_by != "close":
        assert mngr.all_steps() == [0]  # the failed save of step 2 was not made either
        assert mngr.save(3, {"x": np.arange(4) + 3})
        mngr.close()
        assert visible(directory) == ["00000003"]


def test_failure_of_the_save_waited_for_is_raised_by_the_waiting_save(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = install_gate(monkeypatch, root)
    install_disk_full(monkeypatch)
    directory = f"{root}/run"
    mngr = manager(directory)
    mngr.save(1, {"x": np.ones(3)})
    errors: list[BaseException] = []

    def second() -> None:
        try:
            mngr.save(2, {"x": np.ones(3)})
        except KeepaxError as e:
            errors.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.2)
    gate.release()
    thread.join(10)
    assert len(errors) == 1 and errors[0].step == 1  # step 2 is not saved after it
    monkeypatch.undo()
    mngr.close()
    assert visible(directory) == []


def test_staging_failure_is_raised_by_the_call_and_commits_nothing(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(arrays: Any) -> Any:
        raise MemoryError("staging copy")

    monkeypatch.setattr(async_staging, "_host_copies", no_memory)
    directory = f"{root}/run"
    with manager(directory) as mngr:
        with pytest.raises(MemoryError):
            mngr.save(1, {"x": np.ones(3)})
        assert mngr.all_steps() == []
        mngr.check_for_errors()  # the caller already has it: not raised again
        monkeypatch.undo()
        assert mngr.save(2, {"x": np.ones(3)})
    assert visible(directory) == ["00000002"] and hidden(directory) == []


# ---------------------------------------------------------------------------------------------
# Retention after the commit that justifies it.


def test_retention_deletes_only_after_the_newer_step_is_committed(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = f"{root}/run"
    with manager(directory, keep=[policies.KeepLast(1)]) as mngr:
        mngr.save(0, {"x": np.int32(0)})
        mngr.wait_until_finished()
        gate = install_gate(monkeypatch, root)
        mngr.save(1, {"x": np.int32(1)})
        assert gate.entered.wait(10)
        time.sleep(0.1)
        assert visible(directory) == ["00000000"]  # step 1 not committed: 0 untouched
        assert hidden(directory) == [n for n in hidden(directory) if ".keepax-tmp" in n]
        gate.release()
        mngr.wait_until_finished()
        assert visible(directory) == ["00000001"]


def test_retention_never_deletes_for_a_step_that_failed(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = f"{root}/run"
    with manager(directory, keep=[policies.KeepLast(1)]) as mngr:
        mngr.save(0, {"x": np.int32(0)})
        mngr.wait_until_finished()
        install_disk_full(monkeypatch)
        mngr.save(1, {"x": np.int32(1)})
        with pytest.raises(KeepaxError, match="step 1"):
            mngr.wait_until_finished()
        assert mngr.all_steps() == [0] and visible(directory) == ["00000000"]
        monkeypatch.undo()


# ---------------------------------------------------------------------------------------------
# Exit and kill -9.

EXIT_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import jax.numpy as jnp
    import keepax
    from keepax._src.io.local import LocalStorage

    original = LocalStorage.create
    def slow(self, name):
        if "/data/" in name:
            time.sleep(0.5)  # the process reaches its end while the writes are in flight
        return original(self, name)
    LocalStorage.create = slow

    root = sys.argv[1]
    handle = keepax.save_async(os.path.join(root, "single"), {"w": jnp.arange(1000)})
    mngr = keepax.CheckpointManager(os.path.join(root, "run"), max_in_flight=2)
    mngr.save(7, {"w": jnp.arange(10)})
    print("returned", handle.done(), mngr.save_records, flush=True)
    """
)


def test_interpreter_exit_waits_for_pending_saves(tmp_path: Any) -> None:
    script = tmp_path / "child.py"
    script.write_text(EXIT_CHILD)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"returned False ()" in proc.stdout
    np.testing.assert_array_equal(keepax.restore(str(tmp_path / "single"))["w"], np.arange(1000))
    with manager(str(tmp_path / "run")) as mngr:
        assert mngr.all_steps() == [7]


KILL_CHILD = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import keepax
    from keepax import policies

    N = 1_000_000

    class Position:
        def __init__(self):
            self.position = 0
        def get_state(self):
            return {"position": self.position}
        def set_state(self, state):
            self.position = state["position"]

    def expected(k):
        return {"w": np.arange(N, dtype=np.float32) * np.float32(0.5) + np.float32(k),
                "n": np.full(1000, k, np.int64), "it": {"position": k}, "k": k}

    if __name__ == "__main__":
        mngr = keepax.CheckpointManager(sys.argv[1], keep=[policies.KeepLast(2)],
                                        staging_grace=0)
        it = Position()
        init = {"w": jnp.zeros(N, jnp.float32), "n": np.zeros(1000, np.int64), "it": it, "k": 0}
        state, last = mngr.restore_or_initialize(init)
        k = 0 if last is None else last + 1
        w = jnp.asarray(expected(k)["w"]) if last is None else state["w"] + 1
        n = np.full(1000, k, np.int64)
        it.position = k
        advance = jax.jit(lambda w: w + 1, donate_argnums=0)
        print("ready", k, flush=True)
        while True:
            mngr.save(k, {"w": w, "n": n, "it": it, "k": k}, metrics={"loss": 1 / (k + 1)})
            w = advance(w)  # donates the buffer just saved
            n[:] = k + 1  # mutates the array just saved
            it.position = k + 1
            k += 1
    """
)


def test_kill_9_during_background_writes_leaves_the_latest_step_bit_exact(tmp_path: Any
                                                                          ) -> None:
    rng = random.Random(4)
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    namespace: dict[str, Any] = {}
    exec(compile(KILL_CHILD, "kill_child", "exec"), namespace)  # noqa: S102 - our own source
    expected = namespace["expected"]
    directory = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    latest_seen: list[int] = []
    leftovers = 0
    for iteration in range(5):
        proc = subprocess.Popen([sys.executable, str(script), directory], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ready"):
            proc.kill()
            pytest.fail(f"child did not start: {line!r} {proc.communicate()[1][-3000:]!r}")
        start = int(line.split()[1])
        assert start == (latest_seen[-1] + 1 if latest_seen else 0)  # resumed after the latest
        time.sleep(rng.uniform(0.2, 1.2) if iteration < 4 else 1.5)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        leftovers += len(hidden(directory))  # staging/trash of a write the kill cut short
        # Every visible entry is a complete step (an unreadable one would warn: an error here).
        with manager(directory, read_only=True) as mngr:
            steps = mngr.all_steps()
            assert steps, "nothing committed"
            latest = mngr.latest_step()
            for step in steps:
                got = mngr.restore(step)
                assert_bit_exact(got, expected(step))
            like = {"w": jax.ShapeDtypeStruct((1_000_000,), jnp.float32),
                    "n": np.zeros(1000, np.int64), "it": CountingIterator(), "k": 0}
            back = mngr.restore(latest, like)
            assert back["it"].position == latest and back["k"] == latest
            assert np.asarray(back["w"]).tobytes() == expected(latest)["w"].tobytes()
        assert latest is not None and (not latest_seen or latest >= latest_seen[-1])
        latest_seen.append(latest)
    assert latest_seen[-1] > latest_seen[0]
    print(f"latest step after each kill: {latest_seen}; hidden leftovers seen: {leftovers}")


def test_gc_pauses_nest_across_threads_and_restore_the_collector() -> None:
    """The collector stays paused while any save or restore (in any thread) pauses it, and
    comes back as it was: on if it was on, off if the caller had turned it off."""
    import gc  # noqa: PLC0415

    from keepax._src.util import gc_paused  # noqa: PLC0415

    assert gc.isenabled()
    inner_entered, outer_may_leave = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with gc_paused():
            inner_entered.set()
            outer_may_leave.wait(10)
        seen.append(gc.isenabled())

    with gc_paused():
        thread = threading.Thread(target=other)
        thread.start()
        inner_entered.wait(10)
    seen.append(gc.isenabled())  # the other thread still pauses it
    outer_may_leave.set()
    thread.join()
    assert seen == [False, True] and gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
