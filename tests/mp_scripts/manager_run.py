"""Child script: CheckpointManager scenarios with several processes (tests/test_multihost.py).

Usage: ``manager_run.py SCENARIO DIR``; each scenario reports a JSON result.
"""

import mp_prelude  # noqa: I001 - must come first

import sys

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import keepax  # noqa: E402
from keepax import policies  # noqa: E402
from keepax._src.format import datafiles as keepax_format  # noqa: E402

mesh = mp_prelude.global_mesh((count, 2), ("data", "model"))


def state(step: int) -> dict:
    w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + step
    b = np.full((3,), step, np.int32)
    return {
        "w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("data", "model")),
                                          lambda i: w[i]),
        "b": jax.make_array_from_callback(b.shape, NamedSharding(mesh, P()), lambda i: b[i]),
        "step": step,
    }


def like() -> dict:
    return {"w": jax.ShapeDtypeStruct((8, 4), np.float32,
                                      sharding=NamedSharding(mesh, P("data", "model"))),
            "b": jax.ShapeDtypeStruct((3,), np.int32, sharding=NamedSharding(mesh, P())),
            "step": 0}


def check(restored: dict, step: int) -> None:
    want = state(step)
    for key in ("w", "b"):
        for got, exp in zip(restored[key].addressable_shards, want[key].addressable_shards):
            assert got.index == exp.index and np.array_equal(np.asarray(got.data),
                                                              np.asarray(exp.data)), key
    assert restored["step"] == step


class Iterator:
    """A data iterator whose state is its own process's (a position in its own shard)."""

    def __init__(self, position: int) -> None:
        self.position = position

    def get_state(self) -> dict:
        return {"position": self.position, "shard": f"shard-{index}"}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]
        self.shard = state["shard"]


def fail_writes_on(victim: int, steps: set[int]) -> None:
    """Makes this process's data writes fail for the given steps (a full disk, say)."""
    real = keepax_format.write_data_files

    def failing(storage, directory, sources, **kwargs):
        if index == victim and any(f"{s:08d}" in directory for s in steps):
            raise OSError(28, "No space left on device (injected)")
        return real(storage, directory, sources, **kwargs)

    keepax_format.write_data_files = failing


scenario, directory = sys.argv[1], sys.argv[2]
result: dict = {"index": index}

if scenario == "decisions":
    # Clocks skewed by an hour per process; a 10 s interval policy; the preemption signal
    # reaches process 1 only. Every process must save exactly the same steps.
    offset = 3600.0 * index
    clock = [1000.0 + offset]
    manager = keepax.CheckpointManager(
        directory, save_policy=policies.AnyOf([policies.EveryNSteps(5),
                                               policies.EveryInterval(10)]),
        clock=lambda: clock[0], async_save=True,
    )
    saved = []
    for step in range(1, 13):
        # Process 0's clock advances 4 s a step; the others' by wildly different amounts.
        clock[0] += 4.0 if index == 0 else 1.0 + 30.0 * (step % 3) * index
        if step == 9 and index == count - 1:
            manager.notify_preemption()
        if manager.save(step, state(step)):
            saved.append(step)
        if manager.reached_preemption(step):
            result["stopped_at"] = step
            break
    manager.wait_until_finished()
    result["saved"] = saved
    result["steps"] = manager.all_steps()
    check(manager.restore(like=like()), manager.latest_step())
    manager.close()

elif scenario == "async_failure":
    # A background save fails on one process: the step fails on every process, the error
    # names it, and retention never deletes the step before.
    fail_writes_on(count - 1, {3})
    manager = keepax.CheckpointManager(directory, keep=[policies.KeepLast(1)], async_save=True)
    errors = []
    iterator = Iterator(0)
    for step in (1, 2, 3):
        iterator.position = 1000 * index + step
        manager.save(step, {**state(step), "it": iterator})
    try:
        manager.wait_until_finished()
    except keepax.KeepaxError as e:
        errors.append(str(e))
    result["errors"] = errors
    result["steps"] = manager.all_steps()
    iterator.position = 1000 * index + 4
    manager.save(4, {**state(4), "it": iterator})
    manager.wait_until_finished()
    result["after"] = manager.all_steps()
    fresh = Iterator(-1)
    restored = manager.restore(like={**like(), "it": fresh})
    check(restored, 4)
    assert restored["it"] is fresh
    result["iterator"] = [fresh.position, fresh.shard]
    manager.close()

elif scenario == "host_local_save":
    # Every process saves into its own directory; then process 1 "loses" step 3 (as if it
    # had died before committing it).
    mine = f"{directory}/host{index}"
    manager = keepax.CheckpointManager(mine, host_local=True, async_save=False)
    for step in (1, 2, 3):
        manager.save(step, state(step))
    result["steps"] = manager.all_steps()
    manager.close()
    if index == 1:
        import shutil

        shutil.rmtree(f"{mine}/00000003")

elif scenario == "host_local_retry":
    # Step 2's commit fails on process 1 only: process 0 committed its copy, process 1 did
    # not. Step 2 is no step; saving it again on every process replaces the partial copy.
    from keepax._src.commit import protocol

    real_commit = protocol.commit

    def failing_commit(staging, manifest, **kwargs):
        if index == 1 and staging.name.endswith("00000002") and not result.get("errors"):
            raise OSError(5, "Input/output error (injected)")
        return real_commit(staging, manifest, **kwargs)

    protocol.commit = failing_commit
    manager = keepax.CheckpointManager(f"{directory}/host{index}", host_local=True,
                                       async_save=False, sync_timeout=60)
    manager.save(1, state(1))
    try:
        manager.save(2, state(2))
    except keepax.KeepaxError as e:
        result["errors"] = [str(e)]
    result["steps_after_failure"] = manager.all_steps()
    manager.save(2, state(2))
    result["steps"] = manager.all_steps()
    check(manager.restore(like=like()), 2)
    manager.close()

elif scenario == "host_local_restore":
    mine = f"{directory}/host{index}"
    manager = keepax.CheckpointManager(mine, host_local=True, discard_newer=True)
    result["steps"] = manager.all_steps()
    result["latest"] = manager.latest_step()
    stats = keepax.RestoreStats()
    check(manager.restore(like=like(), stats=stats), manager.latest_step())
    result["bytes_read"] = stats.bytes_read
    manager.wait_until_finished()  # the discarded steps' files are removed in the background
    import os

    result["left"] = sorted(n for n in os.listdir(mine) if not n.startswith("."))
    manager.close()

elif scenario == "host_local_behind":
    # A restart after host_local_save (process 1 lacks step 3), without discard_newer: step 3
    # is no step, and saving step 3 again on every host replaces process 0's partial copy.
    import os

    mine = f"{directory}/host{index}"
    manager = keepax.CheckpointManager(mine, host_local=True, async_save=False, sync_timeout=60)
    result["steps"] = manager.all_steps()
    manager.save(3, state(3))
    result["after"] = manager.all_steps()
    check(manager.restore(like=like()), 3)
    result["left"] = sorted(os.listdir(mine))
    manager.close()

elif scenario == "incremental_refused":
    # incremental=True needs a shared directory: with host_local every process is told at
    # construction.
    try:
        keepax.CheckpointManager(f"{directory}/p{index}", incremental=True, host_local=True,
                                 sync_timeout=60)
        result["error"] = None
    except keepax.KeepaxError as e:
        result["error"] = str(e)

else:
    raise SystemExit(f"unknown scenario {scenario}")
mp_prelude.report(result)
