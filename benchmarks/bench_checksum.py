"""What CRC-32C checksums cost keepax's save and restore, measured in one run.

Saves and restores the same ~1 GiB tree (190 float32 arrays) alternately with checksums on
(the shipped code) and off (``format.checksum`` replaced by a function returning 0, and
verification skipped by storing 0), several times, and reports medians and the ratio.
Also reports raw CRC-32C throughput on one core.

    .venv/bin/python benchmarks/bench_checksum.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import keepax
from keepax._src.format import datafiles as fmt


def make_state(total_bytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    big = (total_bytes - 186 * 4096 * 4) // 4 // 4
    state = {f"matrix{i}": rng.random(big, dtype=np.float32).reshape(-1, 1024) for i in range(4)}
    state.update({f"vector{i:03d}": rng.random(4096, dtype=np.float32) for i in range(186)})
    return state


def timed(fn) -> float:  # noqa: ANN001
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    state = make_state(int(args.gib * (1 << 30)))
    nbytes = sum(a.nbytes for a in state.values())
    work = tempfile.mkdtemp(dir=args.dir)
    real_checksum = fmt.checksum
    buffer = np.ones(1 << 28, np.uint8)
    crc_seconds = statistics.median(timed(lambda: real_checksum(memoryview(buffer))) for _ in range(5))

    results: dict[str, list[float]] = {"save_crc": [], "save_nocrc": [], "restore_crc": [],
                                       "restore_nocrc": []}
    try:
        for r in range(args.repeats):
            for mode in ("crc", "nocrc"):
                fmt.checksum = real_checksum if mode == "crc" else (lambda data, value=0: 0)
                path = os.path.join(work, f"{mode}-{r}")
                results[f"save_{mode}"].append(timed(lambda: keepax.save(path, state)))
                results[f"restore_{mode}"].append(timed(lambda: keepax.restore(path)))
                shutil.rmtree(path)
    finally:
        fmt.checksum = real_checksum
        shutil.rmtree(work, ignore_errors=True)

    medians = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "bytes": nbytes,
        "repeats": args.repeats,
        "crc32c_gib_per_s_one_core": (1 << 28) / crc_seconds / (1 << 30),
        "seconds": results,
        "medians": medians,
        "save_crc_over_nocrc": medians["save_crc"] / medians["save_nocrc"],
        "restore_crc_over_nocrc": medians["restore_crc"] / medians["restore_nocrc"],
    }
    print(json.dumps(report, indent=2))
    print()
    print("| | with CRC-32C (s) | without (s) | ratio |")
    print("|---|---:|---:|---:|")
    for op in ("save", "restore"):
        a, b = medians[f"{op}_crc"], medians[f"{op}_nocrc"]
        print(f"| {op} {nbytes / (1 << 30):.2f} GiB (warm cache for restore) | {a:.3f} | {b:.3f} "
              f"| {a / b:.3f} |")
    print(f"\nCRC-32C alone: {report['crc32c_gib_per_s_one_core']:.1f} GiB/s on one core")


if __name__ == "__main__":
    main()
