"""Compression: ratio and save/restore time of keepax ``compression="zstd"`` against keepax
uncompressed and Orbax's ``StandardCheckpointer`` (its defaults: OCDBT, zarr3 with zstd), on
the same states in the same run (each state ``--mib`` MiB; medians of ``--repeats``).

    PYTHONPATH=src python benchmarks/bench_compression.py --mib 64 --repeats 3
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


def _median_time(fn: Callable[[], Any], repeats: int, before: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/keepax-bench-compression")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--no-orbax", action="store_true")
    args = parser.parse_args()
    ocp = None
    if not args.no_orbax:
        import orbax.checkpoint as ocp  # noqa: PLC0415 - optional
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    results: dict[str, Any] = {"mib": args.mib, "repeats": args.repeats, "cores": os.cpu_count()}
    for name, state in states(args.mib).items():
        raw = sum(x.nbytes for x in jax.tree.leaves(state))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), state)
        row: dict[str, Any] = {"bytes": raw}
        systems: dict[str, tuple[Callable[[str], Any], Callable[[str], Any]]] = {
            "keepax_raw": (lambda p, s=state: keepax.save(p, s),
                           lambda p, a=abstract: keepax.restore(p, a)),
            "keepax_zstd": (lambda p, s=state: keepax.save(p, s,
                                                           compression=("zstd", args.level)),
                            lambda p, a=abstract: keepax.restore(p, a)),
        }
        if ocp is not None:
            ckptr = ocp.StandardCheckpointer()

            def orbax_save(p: str, s: Any = state, c: Any = ckptr) -> None:
                c.save(p, s)
                c.wait_until_finished()

            systems["orbax"] = (orbax_save,
                                lambda p, a=abstract, c=ckptr: jax.block_until_ready(
                                    c.restore(p, a)))
        for system, (save, restore) in systems.items():
            path = os.path.join(args.dir, f"{name}-{system}")
            save_s = _median_time(lambda p=path, f=save: f(p), args.repeats,
                                  lambda p=path: shutil.rmtree(p, ignore_errors=True))
            size = _du(path)
            restore_s = _median_time(lambda p=path, f=restore: jax.block_until_ready(f(p)),
                                     args.repeats, lambda: None)
            out = restore(path)
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(out), jax.tree.leaves(state)))
            row[system] = {"ratio": round(size / raw, 4), "save_s": round(save_s, 3),
                           "restore_s": round(restore_s, 3),
                           "save_mb_s": round(raw / save_s / 1e6), "restore_mb_s":
                           round(raw / restore_s / 1e6)}
            shutil.rmtree(path, ignore_errors=True)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
