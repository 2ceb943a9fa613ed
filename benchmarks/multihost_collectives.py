#!/usr/bin/env python
"""What the collectives of one multi-process save cost (``bench_multihost.py --collectives``).

With 2, 4 and 8 real JAX processes (2 CPU devices each) on this machine, each process saves a
small state (``--repeats`` times, after one warm-up save) and times every collective the save
makes, by name: ``agree`` (the agreement every save begins with, issue 11), then
``staging`` (process 0 says where to write), ``written`` (every process's outcome) and
``committed`` (process 0's commit outcome). "Before" the agreement step a save made the last
three; "after", all four. A collective's time on a process includes waiting for the slowest
peer to arrive, so the bare cost is measured too: back-to-back ``all_gather`` and
``broadcast`` calls of the same small JSON values, after a barrier.

Times are medians over the repeats, in ms, of the slowest process (the save's critical path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tests"))

DEVICES = 2
SAVE_STAGES = ("agree", "staging", "written", "committed")


def child(args: argparse.Namespace) -> int:
    import mp_prelude  # noqa: I001 - before jax

    index, count = mp_prelude.init()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import keepax
    from keepax._src.commit import coordination

    timings: list[tuple[str, float]] = []
    real = coordination.JaxCoordinator._collective

    def timed(self: Any, name: str, *rest: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return real(self, name, *rest, **kwargs)
        finally:
            timings.append((name.rsplit(".", 1)[-1], time.perf_counter() - began))

    coordination.JaxCoordinator._collective = timed  # type: ignore[method-assign]
    mesh = mp_prelude.global_mesh((count, DEVICES), ("data", "model"))
    w = np.arange(count * 16 * 64, dtype=np.float32).reshape(count * 16, 64)
    state = {
        "w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, PartitionSpec("data")),
                                          lambda i: w[i]),
        "b": jax.make_array_from_callback((16,), NamedSharding(mesh, PartitionSpec()),
                                          lambda i: np.ones(16, np.float32)[i]),
        "step": 1,
    }
    saves: list[dict[str, float]] = []
    for r in range(args.repeats + 1):
        timings.clear()
        began = time.perf_counter()
        keepax.save(os.path.join(args.path, f"s{r}"), state, timeout=120)
        total = time.perf_counter() - began
        if r:  # the first is a warm-up
            per = {stage: sum(s for n, s in timings if n == stage) for stage in SAVE_STAGES}
            saves.append({**per, "save": total})
    bare = coordination.current("keepax-bench")
    bare.barrier("start", timeout=120)
    bare_times: dict[str, list[float]] = {"all_gather": [], "broadcast": []}
    value = {"where": args.path, "step": 1, "error": None, "tables": [[index, "x", 1, 2, False]]}
    for _ in range(args.bare):
        began = time.perf_counter()
        bare.all_gather("g", value, timeout=120)
        bare_times["all_gather"].append(time.perf_counter() - began)
        began = time.perf_counter()
        bare.broadcast("b", value, timeout=120)
        bare_times["broadcast"].append(time.perf_counter() - began)
    mp_prelude.report({"process": index, "saves": saves,
                       "bare": {k: statistics.median(v) for k, v in bare_times.items()}})
    return 0


def run_group(n: int, work: str, cargs: list[str], timeout: float) -> list[dict[str, Any]]:
    """Runs ``n`` children of this script to the end; their results, by index."""
    from multiproc import run_processes

    return [r.result for r in run_processes(
        os.path.abspath(__file__), n, tmp_path=Path(work), args=["--child", *cargs],
        timeout=timeout, devices_per_process=DEVICES)]


def summarise(n: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage, the median over repeats of the slowest process's time (ms)."""
    repeats = len(results[0]["saves"])
    row: dict[str, Any] = {"processes": n}
    for stage in (*SAVE_STAGES, "save"):
        row[stage] = 1e3 * statistics.median(
            max(r["saves"][i][stage] for r in results) for i in range(repeats))
    row["before"] = row["staging"] + row["written"] + row["committed"]
    row["after"] = row["before"] + row["agree"]
    for kind in ("all_gather", "broadcast"):
        row[f"bare_{kind}"] = 1e3 * max(r["bare"][kind] for r in results)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="2,4,8", help="process counts (default 2,4,8)")
    p.add_argument("--repeats", type=int, default=5, help="timed saves per count (default 5)")
    p.add_argument("--bare", type=int, default=20, help="bare collectives timed (default 20)")
    p.add_argument("--dir", default=os.path.join(REPO, "bench_out"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import bench_core

    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="collectives-", dir=os.path.abspath(args.dir))
    rows = []
    try:
        for n in (int(x) for x in args.processes.split(",")):
            path = os.path.join(work, f"p{n}")
            cargs = ["--path", path, "--repeats", str(args.repeats), "--bare", str(args.bare)]
            rows.append(summarise(n, run_group(n, work, cargs, args.timeout)))
            bench_core.log(f"{n} processes: {rows[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| processes | agree | staging | written | committed | before (3) | after (4) | "
             "whole save | bare all_gather | bare broadcast |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['agree']:.1f} | {r['staging']:.1f} | {r['written']:.1f} | "
            f"{r['committed']:.1f} | {r['before']:.1f} | {r['after']:.1f} | {r['save']:.1f} | "
            f"{r['bare_all_gather']:.1f} | {r['bare_broadcast']:.1f} |")
    result = {"benchmark": "keepax multi-process save collectives (ms)",
              "command": " ".join(["benchmarks/bench_multihost.py", "--collectives",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": bench_core.machine_info(args.dir), "repeats": args.repeats,
              "rows": rows}
    bench_core.write_report(result, args.dir, "multihost_collectives", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
