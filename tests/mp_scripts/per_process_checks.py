"""Child script: per-process values (tests/test_multihost.py).

Usage: ``per_process_checks.py save|restore DIR``. ``save`` saves, then restores, a state
whose ``keepax.PerProcess`` values differ between processes (in length too); ``restore``
restores it on another process count.
"""

import mp_prelude  # noqa: I001 - must come first

import sys

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import keepax  # noqa: E402


def iterator_state(i: int) -> dict:
    """What process ``i``'s data iterator would report: its own position and shard list."""
    return {"position": 100 * i + 7, "files": np.arange(i + 1, dtype=np.int64),
            "name": f"shard-{i}"}


def plain(value: dict) -> dict:
    return {"position": value["position"], "files": np.asarray(value["files"]).tolist(),
            "name": value["name"]}


command, path = sys.argv[1], f"{sys.argv[2]}/ckpt"
mesh = mp_prelude.global_mesh((count, len(jax.devices()) // count), ("data", "model"))
rows = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
sharding = NamedSharding(mesh, P("data"))
like = {"x": jax.ShapeDtypeStruct(rows.shape, rows.dtype, sharding=sharding),
        "it": keepax.PerProcess(None)}
result: dict = {"index": index}
if command == "save":
    x = jax.make_array_from_callback(rows.shape, sharding, lambda i: rows[i])
    keepax.save(path, {"x": x, "it": keepax.PerProcess(iterator_state(index)), "lr": 0.5},
                timeout=60)
    restored = keepax.restore(path, {**like, "lr": 0.0})
    result["mine"] = plain(restored["it"])
    result["all"] = [plain(v) for v in keepax.restore(path, per_process="all")["it"]]
    result["verify"] = keepax.verify(path)
elif command == "restore":
    try:
        keepax.restore(path, like, partial=True)
        result["refused"] = None
    except keepax.KeepaxError as e:
        result["refused"] = {"leaf": e.leaf, "message": str(e)}
    result["third"] = plain(keepax.restore(path, like, partial=True, per_process=3)["it"])
    restored = keepax.restore(path, like, partial=True, per_process="all")
    result["all"] = [plain(v) for v in restored["it"]]
    for shard in restored["x"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), rows[shard.index])
else:
    raise SystemExit(f"unknown command {command}")
mp_prelude.report(result)
