"""Child script of tests/test_coordination.py: every collective, on every process.

Asserts in place (a failure exits 1 with its traceback in the log) and reports timings and
error messages back to the test.
"""

import time

import mp_prelude  # first: configures JAX for this process

index, count = mp_prelude.init()

from jax._src import distributed  # noqa: E402

from keepax._src.commit import coordination  # noqa: E402
from keepax.errors import KeepaxError  # noqa: E402

log = mp_prelude.log
report: dict = {}
coord = coordination.current()
assert isinstance(coord, coordination.JaxCoordinator), coord
assert coordination.current() is coord
assert (coord.process_index, coord.process_count) == (index, count)
T = 20.0  # generous: never reached when all goes well

# barrier
for _ in range(3):
    coord.barrier("barrier", timeout=T)

# broadcast: from process 0 and from the last process; others' values are ignored
got = coord.broadcast("bcast", {"step": 7, "dirs": ["a", "b"]} if index == 0 else None, timeout=T)
assert got == {"step": 7, "dirs": ["a", "b"]}, got
got = coord.broadcast("bcast-last", ("from", index), timeout=T, source=count - 1)
assert got == ["from", count - 1], got

# all_gather, indexed by process
got = coord.all_gather("gather", {"i": index, "sq": index * index}, timeout=T)
assert got == [{"i": i, "sq": i * i} for i in range(count)], got

# agree: everyone fine, then an error on process 1 raises on every process
coord.agree("agree-ok", None, timeout=T)
try:
    coord.agree(
        "write", "OSError: disk full" if index == 1 else None, timeout=T, step=5, path="/ckpt/5"
    )
except KeepaxError as e:
    assert e.step == 5 and e.path == "/ckpt/5", (e.step, e.path)
    report["agree_error"] = str(e)
else:
    raise AssertionError(f"agree did not raise on process {index}")
# several failing processes (the last two)
failing = {count - 2, count - 1}
try:
    coord.agree("write2", f"boom on {index}" if index in failing else None, timeout=T)
except KeepaxError as e:
    report["agree_error2"] = str(e)
else:
    raise AssertionError("agree did not raise")

# the store stays bounded: at most the keys of the previous call (until process 0 deletes
# them), this call and the next (published by processes already past this call)
client = distributed.global_state.client
sizes = []
for k in range(40):
    coord.all_gather("many", k, timeout=T)
    keys = [key for key, _ in client.key_value_dir_get(coord.namespace + "/")]
    sizes.append(len(keys))
    seqs = {int(key.split("/")[1]) for key in keys}
    assert len(seqs) <= 3, keys
report["max_keys"] = max(sizes)
coord.barrier("before-timeout", timeout=T)

# a barrier timeout names the process that did not come; the late comer also fails. The
# runtime notices a barrier's deadline up to ~1 s late, hence the long delay.
t0 = time.monotonic()
if index == 1:
    time.sleep(3.5)  # arrives after everyone else gave up
try:
    coord.barrier("commit", timeout=1.0, step=9, path="/ckpt/9")
except KeepaxError as e:
    report["timeout_error"] = str(e)
    report["timeout_elapsed"] = time.monotonic() - t0
    assert e.step == 9 and e.path == "/ckpt/9"
else:
    raise AssertionError(f"barrier did not time out on process {index}")


# every process made the same calls, so the sequences still agree: collectives go on working
got = coord.all_gather("after-timeout", index, timeout=T)
assert got == list(range(count)), got

mp_prelude.report(report)
log("done", report)
