#!/usr/bin/env python
"""Incremental saves with several processes (``bench_incremental.py``'s fine-tune state, sharded).

Two real JAX processes (2 CPU devices each) run a manager over one shared directory and save a
fine-tune state ``--saves`` times: a frozen base of ``--gib`` GiB (float32, its rows sharded
over all four devices, the same ``jax.Array`` objects at every save) and an adapter of 2 % of
its size with Adam moments (sharded the same way), the adapter changing at every save. Each
configuration (``incremental=False`` and ``True``) runs in its own group of processes, the order
alternating over ``--rounds``. Measured: each save's time on the slowest process (synchronous
saves, ``async_save=False``), the bytes each save added to the directory, the directory's size
at the end, and a restore of the last step (``like``, the slowest process).
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
ADAPTER = 0.02


def _du(path: str) -> int:
    """Bytes of the regular files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def child(args: argparse.Namespace) -> int:
    import mp_prelude  # noqa: I001 - before jax

    index, count = mp_prelude.init()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import keepax

    mesh = mp_prelude.global_mesh((count * DEVICES,), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    width = 1024
    per = count * DEVICES  # every sharded dimension divides evenly over the devices
    rows_per_layer = per * max(1, int(args.gib * 2**30 / 4 / width / 8 / per))
    m = per * max(1, int(8 * rows_per_layer * ADAPTER / per))

    def sharded(shape: tuple[int, int], seed: int) -> jax.Array:
        def make(i: Any) -> np.ndarray:
            start = i[0].start or 0
            rng = np.random.default_rng([seed, start])
            return rng.standard_normal((len(range(*i[0].indices(shape[0]))), shape[1]),
                                       dtype=np.float32)
        return jax.make_array_from_callback(shape, rows, make)

    base = {f"layer{k}": sharded((rows_per_layer, width), k) for k in range(8)}

    def state(step: int) -> dict[str, Any]:
        return {"base": base, "step": step,
                "adapter": {name: sharded((m, width), 1000 * step + j)
                            for j, name in enumerate(("w", "mu", "nu"))}}

    saves: list[float] = []
    added: list[int] = []
    with keepax.CheckpointManager(args.path, incremental=args.incremental, async_save=False,
                                  sync_timeout=300) as manager:
        for step in range(1, args.saves + 1):
            tree = state(step)
            size = _du(args.path) if index == 0 else 0
            began = time.perf_counter()
            manager.save(step, tree, force=True)
            saves.append(time.perf_counter() - began)
            if index == 0:
                added.append(_du(args.path) - size)
        like = state(args.saves)
        began = time.perf_counter()
        restored = manager.restore(args.saves, like=like)
        jax.block_until_ready(restored)
        restore = time.perf_counter() - began
    changed = sum(a.nbytes for a in state(1)["adapter"].values())
    mp_prelude.report({"process": index, "saves": saves, "added": added, "restore": restore,
                       "disk": _du(args.path) if index == 0 else 0, "changed": changed,
                       "base": sum(a.nbytes for a in base.values())})
    return 0


def run_group(work: str, cargs: list[str], timeout: float) -> list[dict[str, Any]]:
    """Runs the two children of this script to the end; their results, by process."""
    from multiproc import run_processes

    results = run_processes(os.path.abspath(__file__), 2, tmp_path=Path(work),
                            args=["--child", *cargs], timeout=timeout,
                            devices_per_process=DEVICES)
    return sorted((r.result for r in results), key=lambda r: r["process"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=0.25, help="size of the frozen base (GiB)")
    p.add_argument("--saves", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    p.add_argument("--dir", default=os.path.join(REPO, "bench_out"))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--incremental", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import bench_core

    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="mp-incremental-", dir=os.path.abspath(args.dir))
    runs: dict[bool, list[list[dict[str, Any]]]] = {False: [], True: []}
    try:
        for r in range(args.rounds):
            for incremental in ((False, True) if r % 2 == 0 else (True, False)):
                path = os.path.join(work, f"r{r}-{int(incremental)}")
                cargs = ["--path", path, "--gib", str(args.gib), "--saves", str(args.saves)]
                cargs += ["--incremental"] if incremental else []
                runs[incremental].append(run_group(work, cargs, args.timeout))
                shutil.rmtree(path, ignore_errors=True)
                bench_core.log(f"round {r} incremental={incremental}: "
                               f"{runs[incremental][-1][0]['saves']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for incremental, groups in runs.items():
        slowest = [[max(g[k]["saves"][i] for k in range(2)) for i in range(args.saves)]
                   for g in groups]
        first = groups[0][0]
        rows["True" if incremental else "False"] = {
            "save_1": statistics.median(s[0] for s in slowest),
            "saves_2_n": statistics.median(x for s in slowest for x in s[1:]),
            "added_2_n": statistics.median(x for g in groups for x in g[0]["added"][1:]),
            "disk": statistics.median(g[0]["disk"] for g in groups),
            "restore": statistics.median(max(p["restore"] for p in g) for g in groups),
            "changed": first["changed"], "base": first["base"],
        }
    off, on = rows["False"], rows["True"]
    mib = 2.0**20
    lines = ["| 2 processes, medians | incremental=False | incremental=True |",
             "|---|---:|---:|",
             f"| save 1 (s) | {off['save_1']:.3f} | {on['save_1']:.3f} |",
             f"| saves 2-{args.saves} (s) | {off['saves_2_n']:.3f} | {on['saves_2_n']:.3f} "
             f"({off['saves_2_n'] / on['saves_2_n']:.1f}x faster) |",
             f"| bytes added per save 2-{args.saves} (MiB) | {off['added_2_n'] / mib:.1f} | "
             f"{on['added_2_n'] / mib:.1f} (changed: {on['changed'] / mib:.1f}) |",
             f"| disk used by the {args.saves} steps (MiB) | {off['disk'] / mib:.0f} | "
             f"{on['disk'] / mib:.0f} (base + {args.saves} x adapter: "
             f"{(on['base'] + args.saves * on['changed']) / mib:.0f}) |",
             f"| restore of step {args.saves} (s) | {off['restore']:.3f} | {on['restore']:.3f} |"]
    result = {"benchmark": "keepax incremental saves, 2 processes",
              "command": " ".join(["benchmarks/multihost_incremental.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": bench_core.machine_info(args.dir), "rows": rows}
    bench_core.write_report(result, args.dir, "multihost_incremental", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
