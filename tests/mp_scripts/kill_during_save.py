"""Child script: a save that one process never finishes (it is SIGKILLed), and the recovery.

Usage:
  ``kill_during_save.py stall DIR STAGE VICTIM``: saves step 1, then step 2, during which
  process VICTIM prints ``STALLED <stage>`` at STAGE (``agreement``: before it joins the
  agreement every save begins with; ``before-data``, ``during-data``, ``after-data``,
  ``commit``) and sleeps until the test kills it. A survivor whose save raises prints
  ``FAILED <error>`` at once (the runtime aborts it soon after).
  ``kill_during_save.py recover DIR``: a new manager (all processes) must see step 1 only,
  restore it bit-exactly, have removed the leftovers of step 2, and save step 2 again.
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
from keepax._src.commit import distributed  # noqa: E402
from keepax._src.format import datafiles as keepax_format  # noqa: E402
from keepax._src.format import tables  # noqa: E402
from keepax._src.io import local  # noqa: E402

mesh = mp_prelude.global_mesh((count, 2), ("data", "model"))
SHAPE = (64, 1024)  # 256 KiB, so the data file has bytes worth interrupting


def state(step: int) -> dict:
    w = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) * 3 + step)
    r = np.arange(1000, dtype=np.int32) * step
    return {
        "w": jax.make_array_from_callback(SHAPE, NamedSharding(mesh, P("data", "model")),
                                          lambda i: w[i]),
        "r": jax.make_array_from_callback(r.shape, NamedSharding(mesh, P()), lambda i: r[i]),
        "step": step,
    }


def like() -> dict:
    return {"w": jax.ShapeDtypeStruct(SHAPE, np.float32,
                                      sharding=NamedSharding(mesh, P("data", "model"))),
            "r": jax.ShapeDtypeStruct((1000,), np.int32, sharding=NamedSharding(mesh, P())),
            "step": 0}


def stall(stage: str) -> None:
    print(f"STALLED {stage}", flush=True)
    time.sleep(120)


def install(stage: str, victim: int) -> None:
    """Makes the victim stall at ``stage`` of the save of step 2."""
    if index != victim:
        return
    armed = {"on": False}
    real_write_files = keepax_format.write_data_files
    real_write_one = keepax_format._write_one
    real_encode = tables.encode_table
    real_commit = local.LocalStorage.commit
    real_agree = distributed.agree

    def agree(*args, **kwargs):
        if armed["on"] and stage == "agreement":
            stall(stage)  # before joining: the others wait in the agreement
        return real_agree(*args, **kwargs)

    def write_files(*args, **kwargs):
        if armed["on"] and stage == "before-data":
            stall(stage)
        return real_write_files(*args, **kwargs)

    def write_one(writer, sources, header, *rest):
        if armed["on"] and stage == "during-data":
            writer.write(memoryview(header))  # part of the file is on disk
            stall(stage)
        return real_write_one(writer, sources, header, *rest)

    def encode(*args, **kwargs):
        if armed["on"] and stage == "after-data":
            stall(stage)
        return real_encode(*args, **kwargs)

    def commit(self, staging, name, *, replace):
        if armed["on"] and stage == "commit":
            stall(stage)  # the marker is written inside the staging directory
        return real_commit(self, staging, name, replace=replace)

    keepax_format.write_data_files = write_files
    keepax_format._write_one = write_one
    tables.encode_table = encode
    local.LocalStorage.commit = commit
    distributed.agree = agree
    return armed


command, directory = sys.argv[1], sys.argv[2]
result: dict = {"index": index}
if command == "stall":
    stage, victim = sys.argv[3], int(sys.argv[4])
    armed = install(stage, victim)
    manager = keepax.CheckpointManager(directory, async_save=False)
    manager.save(1, state(1))
    print("SAVED 1", flush=True)
    if armed is not None:
        armed["on"] = True
    try:
        manager.save(2, state(2))
        print("SAVED 2 (unexpected)", flush=True)
    except keepax.KeepaxError as e:  # printed at once: the runtime aborts survivors soon
        print(f"FAILED {type(e).__name__}: {e}", flush=True)
        raise
elif command == "recover":
    manager = keepax.CheckpointManager(directory, async_save=False, staging_grace=0)
    result["steps"] = manager.all_steps()
    result["entries"] = sorted(os.listdir(directory))
    restored = manager.restore(like=like())
    want = state(1)
    for key in ("w", "r"):
        for got, exp in zip(restored[key].addressable_shards, want[key].addressable_shards):
            assert np.array_equal(np.asarray(got.data), np.asarray(exp.data)), key
    assert restored["step"] == 1
    manager.save(2, state(2))
    result["after"] = manager.all_steps()
    manager.close()
else:
    raise SystemExit(f"unknown command {command}")
mp_prelude.report(result)
