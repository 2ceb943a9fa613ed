#!/usr/bin/env python
"""keepax on S3: save / restore against the raw clients moving the same bytes.

One run starts a moto S3 server (a separate process on loopback, so that it does not share
this process's GIL) and measures, for each state size (a transformer-like state of float32
arrays, ~256 MiB and ~1 GiB by default):

- ``keepax.save`` to ``s3://bench/...`` (multipart uploads of its few data files, committed);
- ``keepax.restore(like=state)`` (ranged GETs straight into the arrays, every chunk checked);
- s3fs ``pipe_file`` / ``cat_file`` of one object holding the same bytes;
- boto3 ``put_object`` / ``get_object`` of that object.

Each repeat runs every system once, in an order rotated from repeat to repeat, and deletes
what it wrote. Throughputs are bytes / median seconds; the ratios compare keepax with the
faster raw client of each direction (target: >= 0.8).

Usage::

    .venv/bin/python benchmarks/bench_s3.py                          # --sizes 256,1024 --repeats 5
    .venv/bin/python benchmarks/bench_s3.py --sizes 256 --repeats 3  # quicker

Prints a JSON document (also written to ``<dir>/s3.json``) then a Markdown summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

import numpy as np

MIB = 1 << 20
TARGET = 0.8


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def build_state(mib: int, seed: int = 0) -> dict[str, Any]:
    """A train-state-like tree: 16 MiB weight matrices, their optimizer moments, small
    vectors."""
    rng = np.random.default_rng(seed)
    total = mib * MIB
    n_big = max(1, total // (3 * 16 * MIB))
    layers = []
    for _ in range(n_big):
        layers.append({
            "w": rng.standard_normal((2048, 2048), dtype=np.float32),
            "b": rng.standard_normal(2048, dtype=np.float32),
        })
    params = {"layers": layers}
    zeros = [{"w": np.zeros((2048, 2048), np.float32), "b": np.zeros(2048, np.float32)}
             for _ in layers]
    return {"params": params, "opt": {"mu": zeros, "nu": [
        {"w": np.ones((2048, 2048), np.float32), "b": np.ones(2048, np.float32)}
        for _ in layers]}, "step": 0}


def leaves(tree: Any) -> list[np.ndarray]:
    out: list[np.ndarray] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, np.ndarray):
            out.append(x)

    walk(tree)
    return out


def measure(args: argparse.Namespace, endpoint: str, mib: int) -> dict[str, Any]:
    import boto3
    import s3fs

    import keepax

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    client = boto3.client("s3", endpoint_url=endpoint)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    bucket = f"bench-{mib}"
    client.create_bucket(Bucket=bucket)
    state = build_state(mib)
    nbytes = sum(a.nbytes for a in leaves(state))
    blob = b"".join(a.tobytes() for a in leaves(state))
    like = state
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        began = time.perf_counter()
        result = fn()
        times.setdefault(name, []).append(time.perf_counter() - began)
        return result

    def run_keepax(r: int) -> None:
        url = f"s3://{bucket}/keepax-{r}"
        timed("keepax save", lambda: keepax.save(url, state, storage_options=options))
        out = timed("keepax restore", lambda: keepax.restore(url, like, storage_options=options))
        assert np.array_equal(out["params"]["layers"][0]["w"], state["params"]["layers"][0]["w"])
        fs.rm(f"{bucket}/keepax-{r}", recursive=True)

    def run_s3fs(r: int) -> None:
        path = f"{bucket}/s3fs-{r}"
        timed("s3fs pipe", lambda: fs.pipe_file(path, blob))
        data = timed("s3fs cat", lambda: fs.cat_file(path))
        assert len(data) == len(blob)
        fs.rm(path)

    def run_boto3(r: int) -> None:
        key = f"boto3-{r}"
        timed("boto3 put_object", lambda: client.put_object(Bucket=bucket, Key=key, Body=blob))
        data = timed("boto3 get_object",
                     lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert len(data) == len(blob)
        client.delete_object(Bucket=bucket, Key=key)

    systems = [run_keepax, run_s3fs, run_boto3]
    for r in range(args.repeats):
        order = systems[r % 3 :] + systems[: r % 3]
        for run in order:
            run(r)
        log(f"  {mib} MiB repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: nbytes / MIB / v for k, v in medians.items()}
    best_put = max(rate["s3fs pipe"], rate["boto3 put_object"])
    best_get = max(rate["s3fs cat"], rate["boto3 get_object"])
    return {
        "state_mib": mib,
        "nbytes": nbytes,
        "arrays": len(leaves(state)),
        "seconds": times,
        "median_seconds": medians,
        "mib_per_s": rate,
        "save_vs_best_raw": rate["keepax save"] / best_put,
        "restore_vs_best_raw": rate["keepax restore"] / best_get,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| state | op | keepax MiB/s | s3fs MiB/s | boto3 MiB/s | keepax / faster raw | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        r = res["mib_per_s"]
        label = f"{res['nbytes'] / MIB:.0f} MiB, {res['arrays']} arrays"
        for op, k, s, b, ratio in [
            ("save", "keepax save", "s3fs pipe", "boto3 put_object", res["save_vs_best_raw"]),
            ("restore", "keepax restore", "s3fs cat", "boto3 get_object",
             res["restore_vs_best_raw"]),
        ]:
            verdict = "PASS" if ratio >= TARGET else "MISS"
            lines.append(f"| {label} | {op} | {r[k]:.0f} | {r[s]:.0f} | {r[b]:.0f} | "
                         f"{ratio:.2f}x | >= {TARGET} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="state sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="bench_out", help="where to write s3.json")
    args = parser.parse_args()
    proc, endpoint = start_server()
    try:
        results = []
        for mib in [int(s) for s in args.sizes.split(",")]:
            log(f"state of ~{mib} MiB against moto at {endpoint}")
            results.append(measure(args, endpoint, mib))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import keepax

    doc = {
        "benchmark": "bench_s3",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "keepax": keepax.__version__,
        "server": "moto (separate process, loopback)",
        "repeats": args.repeats,
        "target_vs_faster_raw": TARGET,
        "results": results,
    }
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "s3.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
