#!/usr/bin/env python
"""keepax tools benchmark: import from Orbax and export to safetensors, against Orbax's own
restore and ``safetensors.numpy.save_file`` of the same state.

For a train-state-like tree of float32 arrays (``--gib`` in all, leaves of 1-32 MiB), each run
happens in a fresh process that reports its wall time and its peak extra resident memory
(``VmHWM`` minus the resident size just before the timed work, the peak reset there by writing
5 to ``/proc/self/clear_refs``):

- ``orbax restore``: ``StandardCheckpointer().restore`` of the Orbax checkpoint (as NumPy);
- ``keepax import-orbax``: ``import_orbax`` of the same checkpoint into a new keepax one;
- ``safetensors save_file``: the state, already in memory (not counted), saved by
  ``safetensors.numpy.save_file``;
- ``keepax export``: ``export`` of the keepax checkpoint of the same state to safetensors.

Systems run round-robin within each repeat; medians over ``--repeats``. Page cache warm.

Usage::

    .venv/bin/python benchmarks/bench_tools.py --gib 0.25 --repeats 3   # quick
    .venv/bin/python benchmarks/bench_tools.py                           # 1 GiB, 5 repeats

Prints a JSON document (also written to ``<dir>/tools.json``) then a Markdown table.
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
import textwrap
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

_CHILD = textwrap.dedent("""
    import json, os, sys, time, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import psutil
    mode, src, dst = sys.argv[1:4]

    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024

    def start():
        # The resident size now, and the peak reset to it: what came before is not counted.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return psutil.Process().memory_info().rss

    if mode == "orbax_restore":
        import orbax.checkpoint as ocp
        ck = ocp.StandardCheckpointer()
        meta = ck.metadata(src).item_metadata.tree
        args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in meta}
        base = start()
        began = time.perf_counter()
        out = ocp.PyTreeCheckpointer().restore(
            src, args=ocp.args.PyTreeRestore(restore_args=args))
        seconds = time.perf_counter() - began
    elif mode == "keepax_import":
        import orbax.checkpoint
        from keepax._src.tools.orbax_import import import_orbax
        base = start()
        began = time.perf_counter()
        import_orbax(src, dst)
        seconds = time.perf_counter() - began
    elif mode == "safetensors_save":
        import keepax
        from safetensors.numpy import save_file
        state = keepax.restore(src)
        base = start()
        began = time.perf_counter()
        save_file(state, os.path.join(dst, "model.safetensors"))
        seconds = time.perf_counter() - began
    elif mode == "keepax_export":
        from keepax._src.tools.export import export
        base = start()
        began = time.perf_counter()
        export(src, dst)
        seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "extra_bytes": peak() - base}))
""")

SYSTEMS = {
    "orbax_restore": "Orbax StandardCheckpointer restore",
    "keepax_import": "keepax import-orbax",
    "safetensors_save": "safetensors.numpy.save_file",
    "keepax_export": "keepax export (safetensors)",
}


def make_state(gib: float) -> dict[str, Any]:
    """Float32 leaves of 32 MiB (the bulk) plus small ones, ``gib`` GiB in all."""
    import numpy as np

    rng = np.random.default_rng(0)
    total = int(gib * (1 << 30))
    state: dict[str, Any] = {}
    i = 0
    while total > 0:
        size = min(total, 32 * MIB if i % 4 else MIB)
        state[f"layer_{i:03d}"] = rng.standard_normal(size // 4, dtype=np.float32)
        total -= size
        i += 1
    return state


def run_child(mode: str, src: str, dst: str, mmap_threshold: int | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "JAX_PLATFORMS": "cpu"}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, src, dst], capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the measured processes "
                             "(e.g. 1048576): freed leaves go back to the system at once, so "
                             "the peak shows what is held rather than what malloc keeps")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="keepax-bench-tools-")
    os.makedirs(work, exist_ok=True)
    sys.path.insert(0, os.path.join(REPO, "src"))
    import orbax.checkpoint as ocp

    import keepax

    state = make_state(args.gib)
    nbytes = sum(v.nbytes for v in state.values())
    orbax_path, keepax_path = os.path.join(work, "orbax"), os.path.join(work, "keepax")
    if not args.dir:
        for path in (orbax_path, keepax_path):
            shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(os.path.join(orbax_path, "_CHECKPOINT_METADATA")):
        with ocp.StandardCheckpointer() as ck:
            ck.save(orbax_path, state)
    if not os.path.exists(keepax_path):
        keepax.save(keepax_path, state)
    del state
    results: dict[str, list[dict[str, float]]] = {m: [] for m in SYSTEMS}
    modes = list(SYSTEMS)
    for repeat in range(args.repeats):
        for mode in modes[repeat % len(modes):] + modes[:repeat % len(modes)]:
            dst = os.path.join(work, f"out-{mode}")
            shutil.rmtree(dst, ignore_errors=True)
            if mode == "safetensors_save":
                os.makedirs(dst)
            src = orbax_path if mode in ("orbax_restore", "keepax_import") else keepax_path
            results[mode].append(run_child(mode, src, dst, args.malloc_mmap_threshold))
            shutil.rmtree(dst, ignore_errors=True)
    summary = {
        mode: {"seconds": statistics.median(r["seconds"] for r in runs),
               "extra_mib": statistics.median(r["extra_bytes"] for r in runs) / MIB,
               "gib_per_s": nbytes / (1 << 30) / statistics.median(r["seconds"] for r in runs),
               "runs": runs}
        for mode, runs in results.items()
    }
    doc = {"state_bytes": nbytes, "repeats": args.repeats,
           "malloc_mmap_threshold": args.malloc_mmap_threshold, "results": summary}
    with open(os.path.join(work, "tools.json"), "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2))
    print(f"\nState: {nbytes / (1 << 30):.2f} GiB of float32; medians of {args.repeats} runs, "
          "each in a fresh process.\n")
    print("| operation | seconds | GiB/s | peak extra memory (MiB) |")
    print("|---|---:|---:|---:|")
    for mode, label in SYSTEMS.items():
        s = summary[mode]
        print(f"| {label} | {s['seconds']:.2f} | {s['gib_per_s']:.2f} | {s['extra_mib']:.0f} |")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
