"""Incremental saves: a fine-tune state (frozen base + ~2 % adapter with Adam moments) saved
10 times by a manager, with and without ``incremental``; and a fully changing state, saved by
both in rotating order over ``--repeats`` rounds (medians of each save's wall time).

    PYTHONPATH=src python benchmarks/bench_incremental.py --gib 0.25 --dir /tmp/bench-incr
    PYTHONPATH=src python benchmarks/bench_incremental.py --gib 0.25 --only-full --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

import keepax


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _finetune(gib: float, step: int, rng: np.random.Generator, base: dict) -> dict:
    n = int(gib * (1 << 30) * 0.02 / 4 / 3)  # adapter + mu + nu ~ 2 % of the base
    a = rng.standard_normal(n, dtype=np.float32)
    return {"base": base, "adapter": a, "opt": {"mu": a * 0.1, "nu": a * a, "count": step}}


def _run(d: str, states: list, incremental: bool, restore: bool = True,
         cpu: list[float] | None = None) -> tuple[list[float], list[int], float]:
    """Saves ``states`` as steps 0, 1, ...: each save's wall seconds (its CPU seconds
    appended to ``cpu``), the bytes it added, and the seconds to restore the last step."""
    shutil.rmtree(d, ignore_errors=True)
    times, written = [], []
    with keepax.CheckpointManager(d, incremental=incremental, async_save=False) as m:
        for step, state in enumerate(states):
            before = _du(d)
            c, t = time.process_time(), time.perf_counter()
            m.save(step, state)
            times.append(time.perf_counter() - t)
            if cpu is not None:
                cpu.append(time.process_time() - c)
            written.append(_du(d) - before)
    if not restore:
        return times, written, 0.0
    t = time.perf_counter()
    keepax.restore(os.path.join(d, f"{len(states) - 1:08d}"))
    return times, written, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/keepax-bench-incremental")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the fully changing case")
    parser.add_argument("--saves", type=int, default=3, help="saves per fully changing round")
    parser.add_argument("--only-full", action="store_true", help="only the fully changing case")
    parser.add_argument("--jax", action="store_true",
                        help="the frozen base as jax.Arrays (the same objects at every save: "
                             "not hashed again after the first)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = int(args.gib * (1 << 30) / 4)
    base = {f"layer{i}": rng.standard_normal(n // 8, dtype=np.float32) for i in range(8)}
    if args.only_full:
        _fully_changing(args, base)
        return
    if args.jax:
        import jax

        base = {k: jax.device_put(v) for k, v in base.items()}
    states = [_finetune(args.gib, s, rng, base) for s in range(10)]
    adapter = sum(states[1][k].nbytes for k in ("adapter",)) + sum(
        states[1]["opt"][k].nbytes for k in ("mu", "nu"))
    t = time.perf_counter()
    from keepax._src.format.digests import digest
    for v in base.values():
        digest(np.asarray(v))
    hash_s = time.perf_counter() - t
    print(f"state: base {args.gib:.2f} GiB f32{' jax.Array' if args.jax else ''}, changing {adapter / 2**20:.1f} MiB per step; "
          f"hashing the base: {hash_s:.3f} s")
    for incremental in (False, True):
        d = os.path.join(args.dir, f"inc{int(incremental)}")
        times, written, restore = _run(d, states, incremental)
        print(f"incremental={incremental}: save 1 {times[0]:.2f} s; saves 2-10 mean "
              f"{np.mean(times[1:]):.3f} s, bytes written mean {np.mean(written[1:]) / 2**20:.1f} "
              f"MiB; disk {_du(d) / 2**30:.3f} GiB; restore of step 10 {restore:.2f} s")
        shutil.rmtree(d, ignore_errors=True)
    _fully_changing(args, base)


def _fully_changing(args: argparse.Namespace, base: dict) -> None:
    """Every leaf changes at every save: what ``incremental`` costs when nothing dedups."""
    full = [{"w": {k: v + s for k, v in base.items()}} for s in range(args.saves)]
    times: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for incremental in ((False, True) if r % 2 == 0 else (True, False)):
            d = os.path.join(args.dir, f"full{int(incremental)}")
            saves, _, _ = _run(d, full, incremental, restore=False, cpu=cpus[incremental])
            times[incremental] += saves
            shutil.rmtree(d, ignore_errors=True)
    off, on = np.median(times[False]), np.median(times[True])
    coff, con = np.median(cpus[False]), np.median(cpus[True])
    print(f"fully changing state ({args.repeats} rounds x {args.saves} saves, rotating order): "
          f"median save incremental=False {off:.3f} s, incremental=True {on:.3f} s "
          f"({100 * (on / off - 1):+.1f} %); CPU {coff:.3f} -> {con:.3f} s "
          f"({100 * (con / coff - 1):+.1f} %)")


if __name__ == "__main__":
    main()
