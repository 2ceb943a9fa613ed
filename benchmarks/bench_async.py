#!/usr/bin/env python
"""keepax asynchronous-save benchmark: blocking time, time to commit, and training-loop overhead.

One run measures, for each state (the ~1 GiB and ~4 GiB transformer-like train states of
``bench_core.py``: 196 float32 ``jax.Array``s on CPU, a few big matrices and many small
vectors):

- *one host copy of the state*: ``np.copy(np.asarray(leaf))`` of every leaf, into fresh memory
  (the target reference); for information also ``np.copyto`` into already-touched buffers;
- ``keepax.save`` (synchronous): the reference for the time to commit;
- ``keepax.save_async``: the time it blocks the caller (until it returns) and the total time
  until the checkpoint is committed (``handle.wait()``), with the ``SaveRecord``'s fields;
  for information also with the staging copies keepax can make instead of reading computed
  CPU arrays through views (the private module constant ``async_staging._CPU_STAGING``:
  ``"device"`` on-device copies, ``"host"`` host copies, ``"pinned_host"`` enqueued copies
  into pinned host memory, the accelerators' way);
- Orbax's async save (``ocp.StandardCheckpointer``, an ``AsyncCheckpointer``; OCDBT + zstd by
  default): blocking (until ``save()`` returns) and total (until ``wait_until_finished()``);
- a simulated training loop: a jitted step of known duration (a chain of 1024x1024 matmuls on
  a separate small array, calibrated to ``--step-factor`` x the median synchronous
  ``keepax.save`` of the state: by default a step as long as a save) run ``--loop-steps`` times, each step followed by ``block_until_ready``, then a save of
  the state through a ``keepax.CheckpointManager`` (async, ``KeepLast(2)``) every step; the same
  loop without saves; with Orbax's async ``CheckpointManager`` (``max_to_keep=2``); and, as a
  reference for what the disk write alone costs the computation beside it, with a raw
  write + fsync of the state's bytes (``bench_core.raw_write``, no copy) on a background
  thread every step. Per loop: wall time, time of each step and of each ``save()`` call, CPU
  seconds of all threads, the hypervisor's steal time, and keepax's ``SaveRecord``s.

Every repeat writes into a fresh directory; deletions, ``gc``, ``malloc_trim`` and ``sync`` run
outside the timed regions. The systems of one phase run round-robin within every repeat and
the starting system rotates, so slow disk phases hit every system alike. Ratios are of
medians; medians of per-repeat paired ratios are given too.

Run it under ``taskset -c 0`` to measure on one core (the workers inherit the affinity; the
report gives the CPUs allowed).

Usage::

    .venv/bin/python benchmarks/bench_async.py                      # --sizes 1,4 --repeats 5
    .venv/bin/python benchmarks/bench_async.py --sizes 1 --repeats 1  # quick smoke run

Prints a JSON document (also written to ``<dir>/async.json``), then a Markdown summary (also
written to ``<dir>/async.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_core import (  # noqa: E402 - shared states, cleanup and machine facts
    MIB,
    REPO,
    _aligned_empty,
    _median,
    _paired,
    _ratio,
    build_state,
    import_orbax,
    log,
    machine_info,
    raw_write,
    remove,
    settle,
    summarize,
    tree_nbytes,
    write_report,
)

# Targets from issue 4 (medians).
TARGET_BLOCK_VS_COPY = 1.0
TARGET_BLOCK_VS_ORBAX = 1.0
TARGET_LOOP_DROP = 0.05
TARGET_COMMIT_VS_SYNC = 1.1  # issue 16, target 4
STAGINGS = {"devicestaging": "device", "hoststaging": "host", "pinnedstaging": "pinned_host"}

STEP_DIM = 1024  # the loop's step works on a separate (STEP_DIM, STEP_DIM) float32 array


def state_label(name: str) -> str:
    return f"{name} GiB"


# ---------------------------------------------------------------------------------------------
# The simulated training step.


def cpu_steal_seconds() -> float | None:
    """Time the hypervisor gave this VM's CPUs to others (``steal`` in /proc/stat), all CPUs."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def make_step() -> tuple[Any, Any]:
    """A jitted chain of ``n`` matmuls (``n`` is a traced argument: one compilation for every
    duration). Gain-2 tanh layers keep the values O(1), so no denormals slow it down."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((STEP_DIM, STEP_DIM), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((STEP_DIM, STEP_DIM), dtype=np.float32) * (2 / STEP_DIM**0.5))

    @jax.jit
    def step(x: Any, n: Any) -> Any:
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ w), x)

    return step, x


def time_step(step: Any, x: Any, n: int, repeats: int = 3) -> float:
    import jax.numpy as jnp

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, jnp.int32(n)).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(step: Any, x: Any, target: float) -> dict[str, Any]:
    """Number of matmuls for a step of about ``target`` seconds (measured, then corrected up
    to three times until within 5 %)."""
    probe = 16
    step(x, 1).block_until_ready()  # compile
    per = time_step(step, x, probe, 5) / probe
    n = max(1, round(target / per))
    measured = time_step(step, x, n)
    for _ in range(3):
        if abs(measured / target - 1) <= 0.05:
            break
        n = max(1, round(n * target / measured))
        measured = time_step(step, x, n)
    return {"target_seconds": target, "matmuls": n, "seconds_per_matmul": per,
            "measured_seconds": measured}


class RawSaver:
    """Reference for the loop: writes the state's bytes with ``bench_core.raw_write`` (4 files,
    4 threads, fsync; no staging copy, no manifest, no checksums) on a background thread,
    one save in flight (the next ``save`` joins the previous one), keeping the last 2
    directories. What writing the bytes alone costs a computation running beside it."""

    def __init__(self, directory: str, state: Any) -> None:
        import threading

        self._threading = threading
        self.directory, self.state = directory, state
        self.thread: Any = None
        self.done: list[str] = []
        self.error: BaseException | None = None
        os.makedirs(directory)

    def save(self, i: int) -> None:
        self.wait_until_finished()
        path = os.path.join(self.directory, f"{i:08d}")

        def work() -> None:
            try:
                raw_write(self.state, path)
                self.done.append(path)
                while len(self.done) > 2:
                    shutil.rmtree(self.done.pop(0))
            except BaseException as e:  # noqa: BLE001 - re-raised by the next call
                self.error = e

        self.thread = self._threading.Thread(target=work, name="raw-writer", daemon=True)
        self.thread.start()

    def wait_until_finished(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.wait_until_finished()


# ---------------------------------------------------------------------------------------------
# Worker: every measurement of one state, in one process.


def timing_worker(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import keepax
    from keepax import policies
    from keepax._src.async_engine import staging as async_staging

    name = args._state
    repeats, loop_repeats = args.repeats, args._loop_repeats
    ocp, orbax_note = (None, "Orbax disabled (--no-orbax)") if args.no_orbax else import_orbax()

    t0 = time.perf_counter()
    state = build_state(name)
    build_s = time.perf_counter() - t0
    leaves = jax.tree_util.tree_leaves(state)
    nbytes = tree_nbytes(state)
    log(f"[{state_label(name)}] built {len(leaves)} arrays, {nbytes / MIB:.1f} MiB in {build_s:.1f} s")
    root = os.path.join(args.dir, f"async-work-{name}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)

    # Warm-ups outside the measurements: imports, thread pools, code paths, first-touch of
    # the allocator's memory for a full host copy.
    tiny = {"a": jnp.ones((8, 8)), "b": jnp.zeros(3)}
    keepax.save_async(os.path.join(root, "warm-keepax"), tiny).wait()
    if ocp is not None:
        c = ocp.StandardCheckpointer()
        c.save(os.path.join(root, "warm-orbax"), tiny)
        c.wait_until_finished()
        c.close()
    warm = [np.copy(np.asarray(x)) for x in leaves]
    del warm
    remove(os.path.join(root, "warm-keepax"))
    remove(os.path.join(root, "warm-orbax"))
    settle()

    times: dict[str, list[float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}

    def record(op: str, seconds: float) -> None:
        times.setdefault(op, []).append(seconds)
        log(f"[{state_label(name)}]   {op:<34s} {seconds:8.3f} s")

    # -- phase 1: one save at a time ---------------------------------------------------------

    def run_host_copy(r: int) -> None:
        settle()
        cpu = time.process_time()
        start = time.perf_counter()
        copies = [np.copy(np.asarray(x)) for x in leaves]
        record("host_copy", time.perf_counter() - start)
        times.setdefault("host_copy_cpu", []).append(time.process_time() - cpu)
        del copies
        # Information: the same bytes into buffers already touched (no page faults).
        outs = [_aligned_empty(int(x.size), x.dtype).reshape(x.shape) for x in leaves]
        for o in outs:
            o.fill(0)
        settle()
        start = time.perf_counter()
        for o, x in zip(outs, leaves):
            np.copyto(o, np.asarray(x))
        record("host_copy_touched", time.perf_counter() - start)
        del outs
        settle()

    def run_sync(r: int) -> None:
        path = os.path.join(root, f"sync-{r}")
        settle()
        cpu = time.process_time()
        start = time.perf_counter()
        keepax.save(path, state)
        record("keepax_sync", time.perf_counter() - start)
        times.setdefault("keepax_sync_cpu", []).append(time.process_time() - cpu)
        remove(path)
        settle()

    def keepax_async(op: str, r: int, staging: str | None) -> None:
        # staging None: keepax as shipped; else one of STAGINGS' values (information).
        path = os.path.join(root, f"{op}-{r}")
        previous = getattr(async_staging, "_CPU_STAGING", None)
        if staging is not None:
            async_staging._CPU_STAGING = staging
        try:
            settle()
            cpu = time.process_time()
            start = time.perf_counter()
            handle = keepax.save_async(path, state)
            blocked = time.perf_counter() - start
            rec = handle.wait()
            total = time.perf_counter() - start
            cpu = time.process_time() - cpu
        finally:
            if staging is not None:
                async_staging._CPU_STAGING = previous
        record(f"{op}_blocking", blocked)
        record(f"{op}_total", total)
        times.setdefault(f"{op}_cpu", []).append(cpu)
        times.setdefault(f"{op}_record_blocking", []).append(rec.blocking_seconds)
        times.setdefault(f"{op}_record_write", []).append(rec.write_seconds)
        records.setdefault(op, []).append({
            "blocking_seconds": rec.blocking_seconds, "write_seconds": rec.write_seconds,
            "wait_seconds": rec.wait_seconds, "budget_wait_seconds": rec.budget_wait_seconds,
            "staging_bytes": rec.staging_bytes, "bytes_written": rec.bytes_written,
            "throughput": rec.throughput, "committed": rec.committed,
        })
        remove(path)
        settle()

    def run_keepax(r: int) -> None:
        keepax_async("keepax", r, None)

    def staged_run(kind: str) -> Any:
        return lambda r: keepax_async(f"keepax_{kind}", r, STAGINGS[kind])

    def run_orbax(r: int) -> None:
        path = os.path.join(root, f"orbax-{r}")
        ckptr = ocp.StandardCheckpointer()
        settle()
        cpu = time.process_time()
        start = time.perf_counter()
        ckptr.save(path, state)
        blocked = time.perf_counter() - start
        ckptr.wait_until_finished()
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu
        ckptr.close()
        record("orbax_blocking", blocked)
        record("orbax_total", total)
        times.setdefault("orbax_cpu", []).append(cpu)
        remove(path)
        settle()

    systems = [("host_copy", run_host_copy), ("keepax_sync", run_sync), ("keepax", run_keepax)]
    if ocp is not None:
        systems.append(("orbax", run_orbax))
    for kind in args.stagings.split(",") if args.stagings else []:
        systems.append((f"keepax_{kind}", staged_run(kind)))
    order_log = []
    for r in range(repeats):
        k = r % len(systems)
        order = systems[k:] + systems[:k]
        order_log.append([s for s, _ in order])
        log(f"[{state_label(name)}] saves, repeat {r + 1}/{repeats}: {' -> '.join(s for s, _ in order)}")
        for _, fn in order:
            fn(r)

    # -- phase 2: the simulated training loop ------------------------------------------------

    loop: dict[str, Any] = {}
    if not args.no_loop:
        step, x0 = make_step()
        write_s = statistics.median(times["keepax_sync"])
        cal = calibrate(step, x0, args.step_factor * write_s)
        cal["keepax_save_median_seconds"] = write_s
        cal["factor"] = args.step_factor
        log(f"[{state_label(name)}] step calibrated: {cal['matmuls']} matmuls of {STEP_DIM}^2, "
            f"{cal['measured_seconds']:.3f} s (target {cal['target_seconds']:.3f} s = "
            f"{args.step_factor} x keepax.save {write_s:.3f} s)")
        n = jnp.int32(cal["matmuls"])
        steps = args.loop_steps
        loop_raw: dict[str, list[dict[str, Any]]] = {}

        def run_loop(kind: str, r: int) -> None:
            directory = os.path.join(root, f"loop-{kind}-{r}")
            shutil.rmtree(directory, ignore_errors=True)
            saver = None
            mngr: Any = None
            if kind.startswith("keepax"):
                mngr = keepax.CheckpointManager(directory, keep=[policies.KeepLast(2)])
                saver = lambda i: mngr.save(i, state)  # noqa: E731
            elif kind == "orbax":
                mngr = ocp.CheckpointManager(
                    directory,
                    options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                         enable_async_checkpointing=True),
                )
                saver = lambda i: mngr.save(i, args=ocp.args.StandardSave(state))  # noqa: E731
            elif kind == "raw":
                mngr = RawSaver(directory, state)
                saver = mngr.save
            step_s, save_s = [], []
            previous = async_staging._CPU_STAGING
            if kind.removeprefix("keepax_") in STAGINGS:
                async_staging._CPU_STAGING = STAGINGS[kind.removeprefix("keepax_")]
            settle()
            steal = cpu_steal_seconds()
            cpu = time.process_time()
            began = time.perf_counter()
            for i in range(steps):
                t = time.perf_counter()
                step(x0, n).block_until_ready()
                t2 = time.perf_counter()
                if saver is not None:
                    saver(i)
                t3 = time.perf_counter()
                step_s.append(t2 - t)
                save_s.append(t3 - t2)
            loop_s = time.perf_counter() - began
            cpu = time.process_time() - cpu
            steal = None if steal is None else (cpu_steal_seconds() or 0.0) - steal
            flush_s = 0.0
            recs: list[dict[str, Any]] = []
            if mngr is not None:
                t = time.perf_counter()
                mngr.wait_until_finished()
                flush_s = time.perf_counter() - t
                if kind.startswith("keepax"):
                    recs = [{"step": rec.step, "blocking_seconds": rec.blocking_seconds,
                             "wait_seconds": rec.wait_seconds, "write_seconds": rec.write_seconds,
                             "committed": rec.committed} for rec in mngr.save_records]
                mngr.close()
            async_staging._CPU_STAGING = previous
            loop_raw.setdefault(kind, []).append({
                "loop_seconds": loop_s, "cpu_seconds": cpu, "flush_seconds": flush_s,
                "step_seconds": step_s,
                "save_call_seconds": save_s, "records": recs, "loadavg_after": os.getloadavg(),
                "cpu_steal_seconds": steal,
            })
            record(f"loop_{kind}", loop_s)
            log(f"[{state_label(name)}]     step median {statistics.median(step_s):.3f} s, save() "
                f"median {statistics.median(save_s):.3f} max {max(save_s):.3f} s, flush {flush_s:.3f} s, "
                f"cpu {cpu:.1f} s, steal {steal if steal is not None else float('nan'):.1f} s, "
                f"load {os.getloadavg()[0]:.1f}"
                + (f", writes median {statistics.median(x['write_seconds'] for x in recs):.3f} s, "
                   f"in-flight waits {sum(x['wait_seconds'] for x in recs):.3f} s" if recs else ""))
            times.setdefault(f"loop_{kind}_with_flush", []).append(loop_s + flush_s)
            times.setdefault(f"loop_{kind}_cpu", []).append(cpu)
            times.setdefault(f"loop_{kind}_step_median", []).append(statistics.median(step_s))
            times.setdefault(f"loop_{kind}_save_call_median", []).append(statistics.median(save_s))
            if recs:
                times.setdefault(f"loop_{kind}_write_median", []).append(
                    statistics.median(rec["write_seconds"] for rec in recs))
                times.setdefault(f"loop_{kind}_inflight_wait_total", []).append(
                    sum(rec["wait_seconds"] for rec in recs))
            remove(directory)
            settle()

        kinds = ["none", "keepax"] + ([] if args.no_raw_loop else ["raw"])
        if ocp is not None and not args.no_orbax_loop:
            kinds.append("orbax")
        for kind in args.loop_stagings.split(",") if args.loop_stagings else []:
            kinds.append(f"keepax_{kind}")
        loop_order = []
        for r in range(loop_repeats):
            k = r % len(kinds)
            order = kinds[k:] + kinds[:k]
            loop_order.append(order)
            log(f"[{state_label(name)}] loop ({steps} steps), repeat {r + 1}/{loop_repeats}: "
                f"{' -> '.join(order)}")
            for kind in order:
                run_loop(kind, r)
        loop = {"calibration": cal, "steps": steps, "repeats": loop_repeats, "order": loop_order,
                "raw": loop_raw}

    shutil.rmtree(root, ignore_errors=True)
    return {
        "state": name,
        "label": state_label(name),
        "arrays": len(leaves),
        "bytes": nbytes,
        "build_seconds": build_s,
        "repeats": repeats,
        "orbax_note": orbax_note,
        "keepax_cpu_staging": getattr(async_staging, "_CPU_STAGING", None),
        "jax_devices": [str(d) for d in jax.devices()],
        "order": order_log,
        "times": times,
        "records": records,
        "loop": loop,
        "loadavg_end": os.getloadavg(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
    }


# ---------------------------------------------------------------------------------------------
# Parent: orchestration, analysis, report.


def run_worker(args: argparse.Namespace, state: str, repeats: int, loop_repeats: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", dir=args.dir, delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--_state", state, "--_out", out,
           "--dir", args.dir, "--repeats", str(repeats), "--_loop_repeats", str(loop_repeats),
           "--loop-steps", str(args.loop_steps), "--step-factor", str(args.step_factor)]
    for flag in ("no_orbax", "no_loop", "no_orbax_loop", "no_raw_loop"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    cmd += ["--stagings", args.stagings, "--loop-stagings", args.loop_stagings]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(cmd, stdout=sys.stderr, env=env)
    try:
        if proc.returncode != 0:
            return {"error": f"worker {state} exited with {proc.returncode}"}
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


RATIOS = [
    ("keepax blocking / host copy", "keepax_blocking", "host_copy"),
    ("keepax blocking / host copy into touched buffers", "keepax_blocking", "host_copy_touched"),
    ("keepax blocking / Orbax blocking", "keepax_blocking", "orbax_blocking"),
    ("keepax total / Orbax total", "keepax_total", "orbax_total"),
    ("keepax total / keepax.save (sync)", "keepax_total", "keepax_sync"),
    ("keepax CPU / keepax.save CPU", "keepax_cpu", "keepax_sync_cpu"),
    *[(f"keepax total, {kind} / keepax.save", f"keepax_{kind}_total", "keepax_sync")
      for kind in STAGINGS],
    *[(f"keepax blocking, {kind} / host copy", f"keepax_{kind}_blocking", "host_copy")
      for kind in STAGINGS],
]


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    t = run["times"]
    stats = {op: summarize(v) for op, v in t.items()}
    ratios = {}
    for label, a, b in RATIOS:
        if t.get(a) and t.get(b):
            ratios[label] = {"of_medians": _ratio(_median(t, a), _median(t, b)),
                             "median_of_paired": _paired(t, a, b)}
    loop = run.get("loop") or {}
    if loop:
        steps = loop["steps"]
        base = _median(t, "loop_none")
        for kind in ("keepax", "orbax", "raw", *[f"keepax_{k}" for k in STAGINGS]):
            key = f"loop_{kind}"
            if not t.get(key):
                continue
            with_saves = _median(t, key)
            flush = _median(t, f"{key}_with_flush")
            drop = lambda saves, none: 1 - none / saves  # noqa: E731
            ratios[f"loop throughput drop, {kind}"] = {
                "of_medians": 1 - base / with_saves,
                "median_of_paired": _paired(t, key, "loop_none", drop),
            }
            ratios[f"loop throughput drop incl. final flush, {kind}"] = {
                "of_medians": 1 - base / flush,
                "median_of_paired": _paired(t, f"{key}_with_flush", "loop_none", drop),
            }
            ratios[f"loop overhead per step (s), {kind}"] = {
                "of_medians": (with_saves - base) / steps,
                "median_of_paired": _paired(t, key, "loop_none", lambda a, b: (a - b) / steps),
            }
    return {"stats": stats, "ratios": ratios}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(state: str, what: str, value: float | None, goal: str, ok: bool | None) -> None:
        rows.append({"state": state, "target": what, "value": value, "goal": goal,
                     "status": "n/a" if ok is None else ("PASS" if ok else "MISS")})

    for entry in result["states"].values():
        if "analysis" not in entry:
            continue
        r, label = entry["analysis"]["ratios"], entry["label"]
        v = r.get("keepax blocking / host copy", {}).get("of_medians")
        add(label, "keepax blocking / one host copy (np.copy)", v, f"<= {TARGET_BLOCK_VS_COPY:g}",
            None if v is None else v <= TARGET_BLOCK_VS_COPY)
        v = r.get("keepax total / keepax.save (sync)", {}).get("of_medians")
        add(label, "keepax save_async until committed / keepax.save", v,
            f"<= {TARGET_COMMIT_VS_SYNC:g}", None if v is None else v <= TARGET_COMMIT_VS_SYNC)
        v = r.get("keepax blocking / Orbax blocking", {}).get("of_medians")
        add(label, "keepax blocking / Orbax async blocking", v, f"<= {TARGET_BLOCK_VS_ORBAX:g}",
            None if v is None else v <= TARGET_BLOCK_VS_ORBAX)
        v = r.get("loop throughput drop, keepax", {}).get("of_medians")
        add(label, "loop throughput drop, keepax save every step", v,
            f"< {TARGET_LOOP_DROP:.0%}", None if v is None else v < TARGET_LOOP_DROP)
    return rows


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:+.1f} %"


def cell(stats: dict[str, Any], op: str, per: int = 1) -> str:
    s = stats.get(op)
    if not s:
        return "—"
    return f"{fmt(s['median'] / per)} ({fmt(s['min'] / per)}–{fmt(s['max'] / per)})"


ROWS = [
    ("host_copy", "one host copy: `np.copy` of every leaf (fresh memory) — reference", 1),
    ("host_copy_touched", "host copy into already-touched buffers (`np.copyto`), info", 1),
    ("keepax_sync", "**keepax.save** (synchronous) — reference for the commit", 1),
    ("keepax_blocking", "**keepax.save_async, blocking** (until it returns)", 1),
    ("keepax_total", "**keepax.save_async, total until committed** (`handle.wait()`)", 1),
    ("keepax_record_write", "keepax `SaveRecord.write_seconds`", 1),
    *[row for kind, mode in STAGINGS.items() for row in (
        (f"keepax_{kind}_blocking", f"keepax, `_CPU_STAGING=\"{mode}\"`, blocking, info", 1),
        (f"keepax_{kind}_total", f"keepax, `_CPU_STAGING=\"{mode}\"`, total, info", 1))],
    ("orbax_blocking", "Orbax async save, blocking (until `save()` returns)", 1),
    ("orbax_total", "Orbax async save, total (until `wait_until_finished()`)", 1),
    ("host_copy_cpu", "CPU seconds (all threads): host copy", 1),
    ("keepax_cpu", "CPU seconds (all threads): keepax.save_async until committed", 1),
    ("keepax_sync_cpu", "CPU seconds (all threads): keepax.save", 1),
    *[(f"keepax_{kind}_cpu", f"CPU seconds (all threads): keepax, `{mode}` staging, info", 1)
      for kind, mode in STAGINGS.items()],
    ("orbax_cpu", "CPU seconds (all threads): Orbax async save until finished", 1),
]


def markdown(result: dict[str, Any]) -> str:
    out = []
    m = result["machine"]
    states = [e for e in result["states"].values() if "analysis" in e]
    out.append(f"## keepax async-save benchmark — {m['date_utc']}\n")
    out.append(f"`{result['command']}`\n")
    out.append(f"keepax commit {m['keepax_commit']}, src sha256 {m['keepax_src_sha256']}; "
               f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['filesystem']}, "
               f"Linux {m['kernel']}, Python {m['python']}, "
               + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
               + f"; load average {m['loadavg_start'][0]:.1f} at start, "
               f"{m.get('loadavg_end', [float('nan')])[0]:.1f} at end; CPUs allowed "
               f"{result.get('cpus_allowed')}; GPU: {result['gpu']}\n")
    for e in result["states"].values():
        if "error" in e:
            out.append(f"**{e.get('label', '?')}: ERROR {e['error']}**\n")
    for note in result["notes"]:
        out.append(f"Note: {note}\n")
    if not states:
        return "\n".join(out) + "\n"
    head = " | ".join(f"{e['label']} ({e['arrays']} arrays, {e['bytes'] / MIB:.0f} MiB)" for e in states)
    out.append("### Seconds, median (min–max)\n")
    out.append(f"| operation | {head} |")
    out.append("|---|" + "---:|" * len(states))
    out.append("| repeats | " + " | ".join(str(e["repeats"]) for e in states) + " |")
    for op, label, per in ROWS:
        if any(op in e["analysis"]["stats"] for e in states):
            out.append(f"| {label} | " + " | ".join(cell(e["analysis"]["stats"], op, per) for e in states) + " |")
    staged = [e.get("records", {}).get("keepax") for e in states]
    out.append("| keepax `SaveRecord.staging_bytes`, MiB | "
               + " | ".join(fmt(r[0]["staging_bytes"] / MIB, 1) if r else "—" for r in staged) + " |")
    out.append("")
    if any(e.get("loop") for e in states):
        out.append("### Simulated training loop, seconds per step, median (min–max)\n")
        out.append(f"| | {' | '.join(e['label'] for e in states)} |")
        out.append("|---|" + "---:|" * len(states))
        out.append("| loop repeats × steps | " + " | ".join(
            f"{e['loop']['repeats']} × {e['loop']['steps']}" if e.get("loop") else "—" for e in states) + " |")
        out.append("| step calibrated to (factor × keepax.save median) | " + " | ".join(
            (f"{fmt(e['loop']['calibration']['target_seconds'])} ({e['loop']['calibration']['factor']:g} × "
             f"{fmt(e['loop']['calibration']['keepax_save_median_seconds'])}), "
             f"{e['loop']['calibration']['matmuls']} matmuls") if e.get("loop") else "—" for e in states) + " |")
        for op, label in (
            ("loop_none", "loop without saves, per step"),
            ("loop_keepax", "**loop with keepax `CheckpointManager.save` every step**, per step"),
            ("loop_keepax_with_flush", "… including the final `wait_until_finished()`, per step"),
            ("loop_orbax", "loop with Orbax async `CheckpointManager.save` every step, per step"),
            ("loop_orbax_with_flush", "… including the final `wait_until_finished()`, per step"),
            ("loop_raw", "reference: loop with a raw write+fsync of the state's bytes in a background thread every step, per step"),
            ("loop_raw_with_flush", "… including waiting for the last write, per step"),
            *[row for kind in STAGINGS for row in (
                (f"loop_keepax_{kind}", f"loop with keepax, {kind}, per step (info)"),
                (f"loop_keepax_{kind}_with_flush", "… including the final `wait_until_finished()`, per step"))],
            ("loop_none_cpu", "CPU seconds (all threads) per step, no saves"),
            ("loop_keepax_cpu", "CPU seconds (all threads) per step, keepax saving"),
            ("loop_orbax_cpu", "CPU seconds (all threads) per step, Orbax saving"),
            ("loop_raw_cpu", "CPU seconds (all threads) per step, raw background writes"),
            *[(f"loop_keepax_{kind}_cpu", f"CPU seconds (all threads) per step, keepax {kind}")
              for kind in STAGINGS],
        ):
            if any(op in e["analysis"]["stats"] for e in states):
                steps = [e["loop"]["steps"] if e.get("loop") else 1 for e in states]
                out.append(f"| {label} | " + " | ".join(
                    cell(e["analysis"]["stats"], op, s) for e, s in zip(states, steps)) + " |")
        for op, label in (
            ("loop_none_step_median", "step alone (compute + `block_until_ready`), no saves ¹"),
            ("loop_keepax_step_median", "step alone, keepax saving in the background ¹"),
            ("loop_keepax_save_call_median", "keepax `save()` call in the loop ¹"),
            ("loop_keepax_write_median", "keepax background write per save (`write_seconds`) ¹"),
            ("loop_keepax_inflight_wait_total", "keepax `save()` waiting for a save in flight, sum per loop"),
            ("loop_orbax_step_median", "step alone, Orbax saving in the background ¹"),
            ("loop_orbax_save_call_median", "Orbax `save()` call in the loop ¹"),
            ("loop_raw_step_median", "step alone, raw write in the background ¹"),
            ("loop_raw_save_call_median", "raw writer `save()` call (joins the previous write) ¹"),
            *[row for kind in STAGINGS for row in (
                (f"loop_keepax_{kind}_step_median", f"step alone, keepax ({kind}) saving ¹"),
                (f"loop_keepax_{kind}_save_call_median", f"keepax ({kind}) `save()` call ¹"))],
        ):
            if any(op in e["analysis"]["stats"] for e in states):
                out.append(f"| {label} | " + " | ".join(
                    cell(e["analysis"]["stats"], op) for e in states) + " |")
        out.append("\n¹ median over the steps of a loop, then median (min–max) over repeats.\n")
    out.append("### Ratios (of medians; [median of per-repeat paired ratios])\n")
    labels = []
    for e in states:
        for k in e["analysis"]["ratios"]:
            if k not in labels:
                labels.append(k)
    out.append(f"| ratio | {' | '.join(e['label'] for e in states)} |")
    out.append("|---|" + "---:|" * len(states))
    for k in labels:
        cells = []
        for e in states:
            r = e["analysis"]["ratios"].get(k)
            if not r:
                cells.append("—")
            elif "drop" in k:
                cells.append(f"{pct(r['of_medians'])} [{pct(r['median_of_paired'])}]")
            else:
                cells.append(f"{fmt(r['of_medians'])} [{fmt(r['median_of_paired'])}]")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("### Targets\n")
    out.append("| state | target | value | goal | result |")
    out.append("|---|---|---:|---|---|")
    for row in result["targets"]:
        v = pct(row["value"]) if "drop" in row["target"] else fmt(row["value"])
        out.append(f"| {row['state']} | {row['target']} | {v} | {row['goal']} | **{row['status']}** |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4", help="state sizes in GiB (default 1,4)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each save measurement (default 5)")
    p.add_argument("--repeats-large", type=int, default=None,
                   help="save repeats for states above 2 GiB (default: --repeats)")
    p.add_argument("--loop-repeats", type=int, default=None,
                   help="repeats of each training loop (default: --repeats)")
    p.add_argument("--loop-repeats-large", type=int, default=None,
                   help="loop repeats for states above 2 GiB (default: --loop-repeats)")
    p.add_argument("--loop-steps", type=int, default=10, help="steps per training loop (default 10)")
    p.add_argument("--step-factor", type=float, default=1.0,
                   help="step duration as a multiple of keepax.save's median time (default 1)")
    p.add_argument("--dir", default=os.path.join(REPO, "bench_out"),
                   help="where checkpoints and async.json are written (default bench_out/)")
    p.add_argument("--no-orbax", action="store_true", help="skip Orbax")
    p.add_argument("--no-orbax-loop", action="store_true", help="skip the loop with Orbax's manager")
    p.add_argument("--no-loop", action="store_true", help="skip the training loops")
    p.add_argument("--no-raw-loop", action="store_true",
                   help="skip the loop with raw background writes (reference)")
    p.add_argument("--stagings", default="devicestaging,hoststaging,pinnedstaging",
                   help="informational keepax runs with staging copies, comma-separated, of "
                        f"{','.join(STAGINGS)} (default all; '' for none)")
    p.add_argument("--loop-stagings", default="",
                   help="also run the loop with these staging copies (as --stagings; default none)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_state", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_loop_repeats", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    if args._worker:
        result = timing_worker(args)
        with open(args._out, "w") as f:
            json.dump(result, f)
        return 0

    states = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in states:
        float(s)  # validate
    began = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "keepax async saves",
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                             else sys.executable, os.path.relpath(os.path.abspath(__file__), REPO),
                             *sys.argv[1:]]),
        "machine": machine_info(args.dir),
        "gpu": "none available to this run (CPU-only JAX); the issue's GPU part was not run",
        "targets_goal": {"keepax blocking / host copy": f"<= {TARGET_BLOCK_VS_COPY}",
                         "keepax total / keepax.save": f"<= {TARGET_COMMIT_VS_SYNC}",
                         "keepax blocking / Orbax blocking": f"<= {TARGET_BLOCK_VS_ORBAX}",
                         "loop throughput drop": f"< {TARGET_LOOP_DROP}"},
        "states": {},
        "notes": [],
    }
    result["cpus_allowed"] = sorted(os.sched_getaffinity(0))
    for kind in filter(None, f"{args.stagings},{args.loop_stagings}".split(",")):
        if kind not in STAGINGS:
            raise SystemExit(f"unknown staging {kind!r}: choose from {', '.join(STAGINGS)}")
    for state in states:
        large = float(state) > 2
        repeats = args.repeats_large if large and args.repeats_large else args.repeats
        loop_repeats = args.loop_repeats or args.repeats
        if large and args.loop_repeats_large:
            loop_repeats = args.loop_repeats_large
        log(f"=== {state_label(state)}: {repeats} save repeats, {loop_repeats} loop repeats ===")
        run = run_worker(args, state, repeats, loop_repeats)
        entry: dict[str, Any] = dict(run)
        if "error" not in run:
            entry["analysis"] = analyse(run)
            if run.get("orbax_note"):
                result["notes"].append(f"{state_label(state)}: {run['orbax_note']}")
        result["states"][state] = entry
    result["targets"] = targets(result)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - began
    write_report(result, args.dir, "async", markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
