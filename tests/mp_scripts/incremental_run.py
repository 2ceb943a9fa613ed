"""Child script: multi-process incremental manager saves (tests/test_multihost_incremental.py).

Usage:
  ``incremental_run.py run DIR``: 6 saves of a frozen sharded base and a changing adapter
  (KeepLast(3)); reports per save the store bytes it added and the changed bytes, and checks
  every kept step's restore shard by shard.
  ``incremental_run.py stall DIR``: a new manager saves step 7; process 1 prints ``STALLED``
  once its new chunks are in the store, and sleeps until the test kills it.
  ``incremental_run.py recover DIR``: a new manager (grace 0) reclaims what step 7 left,
  saves it again and checks its restore.
"""

import mp_prelude  # noqa: I001 - must come first

import os
import sys
import time

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import keepax  # noqa: E402
from keepax import policies  # noqa: E402
from keepax._src.checkpoint import incremental  # noqa: E402

scenario, directory = sys.argv[1], sys.argv[2]
mesh = mp_prelude.global_mesh((count, 2), ("data", "model"))
BASE = (256, 512)  # 512 KiB of float32, frozen
ADAPTER = (16, 512)  # 32 KiB, changes at every step
SPECS = {"base": P("data", "model"), "adapter": P("data", "model"), "mu": P("data"),
         "count": P()}


def values(step: int) -> dict[str, np.ndarray]:
    """The global values of step ``step`` (the base never changes)."""
    return {
        "base": np.arange(np.prod(BASE), dtype=np.float32).reshape(BASE) / 7,
        "adapter": np.full(ADAPTER, step, np.float32) + np.arange(ADAPTER[1], dtype=np.float32),
        "mu": np.arange(ADAPTER[0] * 64, dtype=np.float32).reshape(ADAPTER[0], 64) * step,
        "count": np.array([step], np.int32),
    }


def state(step: int) -> dict:
    return {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]),
                                            lambda i, v=v: v[i])
            for k, v in values(step).items()}


def like() -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, SPECS[k]))
            for k, v in values(0).items()}


def check(restored: dict, step: int) -> None:
    want = values(step)
    for k, arr in restored.items():
        for shard in arr.addressable_shards:
            got = np.asarray(shard.data)
            assert np.array_equal(got.view(np.uint8), want[k][shard.index].view(np.uint8)), (
                k, step)


def store_files() -> dict[str, int]:
    data = os.path.join(directory, ".keepax-store", "data")
    names = os.listdir(data) if os.path.isdir(data) else []
    return {n: os.path.getsize(os.path.join(data, n)) for n in names}


def changed_bytes() -> int:
    return sum(v.nbytes for k, v in values(0).items() if k != "base")


result: dict = {}
if scenario == "run":
    base = state(1)["base"]  # the same object at every save (the hint)
    added = []
    with keepax.CheckpointManager(directory, incremental=True, keep=[policies.KeepLast(3)],
                                  sync_timeout=60) as manager:
        for step in range(1, 7):
            before = store_files()
            manager.save(step, {**state(step), "base": base}, force=True)
            manager.wait_until_finished()
            after = store_files()
            added.append(sum(n for f, n in after.items() if f not in before))
        for step in manager.all_steps():
            check(manager.restore(step, like=like()), step)
        result = {"steps": manager.all_steps(), "added": added, "changed": changed_bytes(),
                  "files": sorted(store_files())}

elif scenario == "stall":
    if index == 1:
        real = incremental.SharedSave.write

        def write(self, sources):
            out = real(self, sources)
            print("STALLED", flush=True)  # its new chunks are in the store, durable
            time.sleep(120)
            return out

        incremental.SharedSave.write = write
    with keepax.CheckpointManager(directory, incremental=True, keep=[policies.KeepLast(3)],
                                  sync_timeout=60, async_save=False) as manager:
        manager.save(7, state(7), force=True)
    print("SAVED 7", flush=True)

elif scenario == "recover":
    with keepax.CheckpointManager(directory, incremental=True, keep=[policies.KeepLast(3)],
                                  sync_timeout=60, staging_grace=0) as manager:
        result["steps"] = manager.all_steps()
        result["files_at_start"] = sorted(store_files())
        manager.save(7, state(7), force=True)
        manager.wait_until_finished()
        check(manager.restore(7, like=like()), 7)
        result["after"] = manager.all_steps()
else:
    raise SystemExit(f"unknown scenario {scenario}")
mp_prelude.report(result)
