"""Child script: ``keepax.save_async`` failures in multi-process runs (tests/test_multihost.py).

Usage: ``async_checks.py staging_failure DIR``.

``staging_failure``: the agreement passes, then staging (the private copy of the state that
``save_async`` makes before it returns) fails on process 1 only, as a host out of memory
would. Process 1's call raises; process 0's save must fail at once too, naming process 1 and
its error, long before the save's ``timeout``; nothing is committed; and the processes stay
in step: the next save succeeds on both.
"""

import mp_prelude  # noqa: I001 - must come first

import os
import sys
import time

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import keepax  # noqa: E402
from keepax._src.async_engine import staging  # noqa: E402

command, directory = sys.argv[1], sys.argv[2]
TIMEOUT = 60  # far longer than the harness gives the test: a wait for it fails the test
mesh = mp_prelude.global_mesh((count, len(jax.devices()) // count), ("data", "model"))
rows = np.arange(8 * count * 4, dtype=np.float32).reshape(8 * count, 4)


def state(step: int) -> dict:
    values = rows + step
    return {"x": jax.make_array_from_callback(values.shape, NamedSharding(mesh, P("data")),
                                              lambda i: values[i]),
            "host": np.full(5, step, np.int64), "step": step}


def out_of_memory_on(victim: int) -> dict:
    """Makes this process's staging fail (a host out of memory) while armed, whichever way
    its arrays are staged (copies or views)."""
    armed = {"on": False}
    real = staging._Copies.flush

    def failing(self):
        if armed["on"] and index == victim:
            raise MemoryError("cannot allocate the staging copy (injected)")
        return real(self)

    staging._Copies.flush = failing
    return armed


result: dict = {}
if command == "staging_failure":
    armed = out_of_memory_on(1)
    path = f"{directory}/ckpt"
    armed["on"] = True
    began = time.monotonic()
    try:
        keepax.save_async(path, state(1), timeout=TIMEOUT).wait()
        result["error"] = None
    except (keepax.KeepaxError, MemoryError) as e:
        mp_prelude.log("raised:", type(e).__name__, e)
        result["error"] = f"{type(e).__name__}: {e}"
        result["processes"] = list(getattr(e, "processes", ()) or ())
    result["seconds"] = time.monotonic() - began
    result["timeout"] = TIMEOUT
    result["exists"] = os.path.exists(path)
    armed["on"] = False
    keepax.save_async(path, state(2), timeout=TIMEOUT).wait()
    restored = keepax.restore(path, {"x": jax.ShapeDtypeStruct(
        rows.shape, rows.dtype, sharding=NamedSharding(mesh, P("data"))),
        "host": np.zeros(5, np.int64), "step": 0})
    for shard in restored["x"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), (rows + 2)[shard.index])
    result["after"] = [int(restored["step"]), restored["host"].tolist()]
    result["verify"] = keepax.verify(path)
else:
    raise SystemExit(f"unknown command {command}")
mp_prelude.report(result)
