"""Child script: commit callbacks, run metadata and dtype= with several processes
(tests/test_manager_multihost.py).

Usage: ``manager_habits_run.py DIR``; reports a JSON result.
"""

import mp_prelude  # noqa: I001 - must come first

import sys
import threading

index, count = mp_prelude.init()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import keepax  # noqa: E402
from keepax._src.format import datafiles as keepax_format  # noqa: E402

mesh = mp_prelude.global_mesh((count, 2), ("data", "model"))
directory = sys.argv[1]


def state(step: int) -> dict:
    w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + step
    return {"w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("data", "model")),
                                              lambda i: w[i]),
            "n": np.int32(step)}


real = keepax_format.write_data_files


def failing(storage, where, sources, **kwargs):  # a full disk on the last process, step 3
    if index == count - 1 and "00000003" in where:
        raise OSError(28, "No space left on device (injected)")
    return real(storage, where, sources, **kwargs)


keepax_format.write_data_files = failing

calls = []


def on_commit(step, error):
    calls.append({"step": step, "error": None if error is None else str(error),
                  "process": jax.process_index(), "writer": threading.current_thread().name})


# Process 0 writes the run metadata; every process reads it back.
manager = keepax.CheckpointManager(directory, metadata={"run": "mp", "processes": count})
result = {"run_metadata": manager.run_metadata()}
for step in (1, 2, 3):
    manager.save(step, state(step), dtype=jnp.bfloat16, on_commit=on_commit)
try:
    manager.wait_until_finished()
except keepax.KeepaxError as e:
    result["raised"] = str(e)
result["calls"] = calls
result["steps"] = manager.all_steps()
restored = manager.restore(2)
result["dtypes"] = [str(restored["w"].dtype), str(restored["n"].dtype)]
manager.close()
mp_prelude.report(result)
