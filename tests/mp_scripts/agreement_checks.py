"""Child script: the agreement every multi-process save begins with (tests/test_multihost.py).

Usage: ``agreement_checks.py mixed|differing|straggler DIR``.

``mixed``: save A fails while preparing on process 1 only (a leaf it cannot store); every
process must raise at once. Then process 1 goes on to save B while process 0 retries A: the
processes are out of step, and both must raise without writing. Finally all save B together.

``differing``: a host NumPy array that differs between processes, not marked per process,
fails the save on every process, naming the leaf.

``straggler``: process 1 arrives after process 0's ``timeout=`` ran out: both raise, and
process 0's error names process 1.
"""

import mp_prelude  # noqa: I001 - must come first

import sys
import time

index, count = mp_prelude.init()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import keepax  # noqa: E402
from keepax.errors import PeerProcessError  # noqa: E402

command, directory = sys.argv[1], sys.argv[2]
mesh = mp_prelude.global_mesh((count, len(jax.devices()) // count), ("data", "model"))
rows = np.arange(8 * count * 4, dtype=np.float32).reshape(8 * count, 4)
sharded = jax.make_array_from_callback(rows.shape, NamedSharding(mesh, P("data")),
                                       lambda i: rows[i])
TIMEOUT = 60  # the harness's limit: a save that waited for the timeout would fail the test


def expect_peer_error(label: str, path: str, tree: dict, **kwargs) -> dict:
    began = time.monotonic()
    try:
        keepax.save(path, tree, timeout=TIMEOUT, **kwargs)
    except PeerProcessError as e:
        mp_prelude.log(label, "raised:", e)
        return {"processes": list(e.processes), "message": str(e), "leaf": e.leaf,
                "seconds": time.monotonic() - began}
    raise AssertionError(f"{label}: the save returned on process {index}")


result: dict = {}
if command == "mixed":
    a, b = f"{directory}/A", f"{directory}/B"
    bad = object() if index == 1 else 0  # only process 1 holds a leaf it cannot store
    result["prepare_failure"] = expect_peer_error("A", a, {"x": sharded, "extra": bad})
    # Process 1 caught its failure and goes on with the next save; process 0 retries A.
    result["out_of_step"] = expect_peer_error(
        "A/B", b if index == 1 else a, {"x": sharded, "extra": 0})
    keepax.save(b, {"x": sharded, "extra": 1}, timeout=TIMEOUT)
    like = {"x": jax.ShapeDtypeStruct(rows.shape, rows.dtype,
                                      sharding=NamedSharding(mesh, P("data"))), "extra": 0}
    restored = keepax.restore(b, like)
    for shard in restored["x"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), rows[shard.index])
    result["exists"] = [keepax.inspect(b).path is not None]
    try:
        keepax.inspect(a)
        result["a_exists"] = True
    except keepax.errors.CheckpointNotFoundError:
        result["a_exists"] = False
    result["verify_b"] = keepax.verify(b)
elif command == "differing":
    host = np.full(3, index, dtype=np.int32)  # differs on every process
    result["differing"] = expect_peer_error(
        "differing", f"{directory}/C", {"x": sharded, "cursor": host, "same": np.ones(2)})
elif command == "straggler":
    # Process 1 comes to the save long after process 0's timeout=2 has run out.
    if index == 1:
        time.sleep(6)
    try:
        keepax.save(f"{directory}/D", {"x": sharded}, timeout=2)
        result["straggler"] = None
    except keepax.KeepaxError as e:
        result["straggler"] = str(e)
else:
    raise SystemExit(f"unknown command {command}")
mp_prelude.report(result)
