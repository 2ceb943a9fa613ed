"""Child script: multi-process save and restore checks (run by tests/test_multihost.py).

Usage: ``checkpoint_roundtrip.py save|save-only|restore DIR`` (``save`` also restores the
checkpoint onto the same and a transposed mesh).

The state is a deterministic function of nothing (see ``global_state``), so any process count
can check any restored value against it.
"""

import mp_prelude  # noqa: I001 - must come first

import json
import os
import sys

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
from multihost_state import global_state  # noqa: E402

import keepax  # noqa: E402
from keepax._src.format import boxes  # noqa: E402

SPECS = {
    "w": P("data", "model"),  # sharded over every device
    "rows": P("data"),  # sharded over processes, replicated over model
    "model": P(None, "model"),  # sharded over model, replicated over processes (mixed)
    "bias": P(),  # replicated everywhere
    "small": P("model"),  # sharded over model only
}


def build(mesh: jax.sharding.Mesh) -> dict:
    values = global_state()
    out = dict(values)
    for key, spec in SPECS.items():
        sharding = NamedSharding(mesh, spec)
        value = values[key]
        out[key] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
    out["key"] = jax.random.key(42)
    return out


def like(mesh: jax.sharding.Mesh) -> dict:
    values = global_state()
    out = dict(values)
    for key, spec in SPECS.items():
        out[key] = jax.ShapeDtypeStruct(values[key].shape, values[key].dtype,
                                        sharding=NamedSharding(mesh, spec))
    out["key"] = jax.random.key(0)
    return out


def needed_bytes(mesh: jax.sharding.Mesh) -> int:
    """Bytes of the unique boxes this process's target shards need."""
    values = global_state()
    total = 0
    for key, spec in SPECS.items():
        sharding = NamedSharding(mesh, spec)
        for box in boxes.target_boxes(sharding, values[key].shape):
            total += int(np.prod(box[1])) * values[key].dtype.itemsize
    return total


def check(restored: dict) -> None:
    values = global_state()
    for key in SPECS:
        array = restored[key]
        assert isinstance(array, jax.Array), key
        for shard in array.addressable_shards:
            want = values[key][shard.index]
            got = np.asarray(shard.data)
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8),
                                                              want.view(np.uint8)), key
    for key in ("host", "step", "lr", "name"):
        assert np.array_equal(restored[key], values[key]), key
    assert np.array_equal(jax.random.key_data(restored["key"]),
                          jax.random.key_data(jax.random.key(42)))


# For object stores: storage options (e.g. the S3 endpoint) given by the test as JSON.
OPTIONS = json.loads(os.environ.get("KEEPAX_MP_STORAGE_OPTIONS", "null"))


def restore_and_check(path: str, mesh: jax.sharding.Mesh) -> dict:
    stats = keepax.RestoreStats()
    restored = keepax.restore(path, like(mesh), stats=stats, storage_options=OPTIONS)
    check(restored)
    return {"bytes_read": stats.bytes_read, "table_bytes": stats.table_bytes_read,
            "needed": needed_bytes(mesh), "mesh": list(mesh.devices.shape)}


command, path = sys.argv[1], sys.argv[2]
devices = len(jax.devices())
mesh = mp_prelude.global_mesh((count, devices // count), ("data", "model"))
result: dict = {"index": index}
if command in ("save", "save-only"):
    state = build(mesh)
    saved = keepax.save(path, state, metadata={"processes": count}, storage_options=OPTIONS)
    result["bytes_written"] = saved.bytes_written
if command == "save":
    result["same_mesh"] = restore_and_check(path, mesh)
    flipped = mp_prelude.global_mesh((devices // count, count), ("data", "model"))
    result["flipped_mesh"] = restore_and_check(path, flipped)
elif command == "restore":
    result["same_mesh"] = restore_and_check(path, mesh)
elif command != "save-only":
    raise SystemExit(f"unknown command {command}")
mp_prelude.report(result)
