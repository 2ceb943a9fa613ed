"""Compression: ratio and save/restore time of keepax ``compression="zstd"`` against keepax
uncompressed and Orbax's ``StandardCheckpointer`` (its defaults: OCDBT, zarr3 with zstd), on
the same states in the same run (each state ``--mib`` MiB; medians of ``--repeats``, the order of
the systems rotated each repeat). ``taskset -c 0`` in front measures one core.

    PYTHONPATH=src python benchmarks/bench_compression.py --mib 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import keepax


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def states(mib: int) -> dict[str, dict[str, Any]]:
    """Each state ~``mib`` MiB, as jax.Arrays (what both checkpointers are given)."""
    rng = np.random.default_rng(0)
    n = (mib << 20) // 4
    w = (rng.standard_normal(n, dtype=np.float32) * 0.02).reshape(-1, 1024)
    mu = (rng.standard_normal(n // 2, dtype=np.float32) * 1e-3).reshape(-1, 1024)
    nu = (mu * mu * 0.5 + 1e-8).astype(np.float32)
    zero = np.zeros(n, np.float32)
    zero[rng.random(n) < 0.05] = 1.0
    out = {
        "f32_weights": {"w": w},
        "bf16_weights": {"w": (rng.standard_normal(2 * n, dtype=np.float32) * 0.02)
                         .astype(ml_dtypes.bfloat16).reshape(-1, 1024)},
        "adam_moments": {"mu": mu, "nu": nu},
        "int_tokens": {"tokens": rng.integers(0, 50_257, n, dtype=np.int32).reshape(-1, 1024),
                       "counters": np.arange(1024, dtype=np.int64)},
        "zero_heavy": {"grads_mask": zero.reshape(-1, 1024)},
    }
    return {k: jax.tree.map(jnp.asarray, v) for k, v in out.items()}


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _systems(state: Any, abstract: Any, level: int, ocp: Any
             ) -> dict[str, tuple[Callable[[str], Any], Callable[[str], Any]]]:
    """(save, restore) per system, each given a path."""
    systems: dict[str, tuple[Callable[[str], Any], Callable[[str], Any]]] = {
        "keepax_raw": (lambda p: keepax.save(p, state), lambda p: keepax.restore(p, abstract)),
        "keepax_zstd": (lambda p: keepax.save(p, state, compression=("zstd", level)),
                        lambda p: keepax.restore(p, abstract)),
    }
    if ocp is not None:
        ckptr = ocp.StandardCheckpointer()

        def orbax_save(p: str) -> None:
            ckptr.save(p, state)
            ckptr.wait_until_finished()

        systems["orbax"] = (orbax_save,
                            lambda p: jax.block_until_ready(ckptr.restore(p, abstract)))
    return systems


def _codecs(path: str) -> dict[str, int]:
    """How many chunks of a keepax checkpoint use each codec."""
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        doc = json.load(f)
    counts: dict[str, int] = {}
    for leaf in doc["leaves"]:
        for chunk in leaf.get("chunks", []):
            counts[chunk.get("codec", "raw")] = counts.get(chunk.get("codec", "raw"), 0) + 1
    return counts


def run_state(name: str, state: Any, args: argparse.Namespace, ocp: Any) -> dict[str, Any]:
    """Every system on one state: each repeat saves then restores with every system, the
    order rotated by one per repeat (so no system always runs first or last); medians."""
    raw = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    systems = _systems(state, abstract, args.level, ocp)
    names = list(systems)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    row: dict[str, Any] = {"bytes": raw}
    for repeat in range(args.repeats):
        for system in names[repeat % len(names):] + names[: repeat % len(names)]:
            save, restore = systems[system]
            path = os.path.join(args.dir, f"{name}-{system}")
            shutil.rmtree(path, ignore_errors=True)
            times[system][0].append(_timed(lambda: save(path)))
            times[system][1].append(_timed(lambda: jax.block_until_ready(restore(path))))
            if repeat == args.repeats - 1:
                out = restore(path)
                assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                           zip(jax.tree.leaves(out), jax.tree.leaves(state)))
                save_s, restore_s = (statistics.median(t) for t in times[system])
                row[system] = {"ratio": round(_du(path) / raw, 4), "save_s": round(save_s, 3),
                               "restore_s": round(restore_s, 3),
                               "save_mb_s": round(raw / save_s / 1e6),
                               "restore_mb_s": round(raw / restore_s / 1e6)}
                if system.startswith("keepax"):
                    row[system]["codecs"] = _codecs(path)
            shutil.rmtree(path, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/keepax-bench-compression")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--no-orbax", action="store_true")
    parser.add_argument("--only", nargs="*", help="states to run (default: all)")
    args = parser.parse_args()
    ocp = None
    if not args.no_orbax:
        import orbax.checkpoint as ocp  # noqa: PLC0415 - optional
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results: dict[str, Any] = {"mib": args.mib, "repeats": args.repeats, "cores": cores}
    for name, state in states(args.mib).items():
        if args.only and name not in args.only:
            continue
        results[name] = run_state(name, state, args, ocp)
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
