#!/usr/bin/env python
"""keepax on an accelerator: background-save blocking and commit, and restore, against the
device<->host copies and disk I/O they cannot beat (issue 16, target 6).

One command prepares and runs everything (about 2-4 minutes once the venv exists)::

    python benchmarks/bench_gpu.py             # CUDA GPU: venv with jax[cuda12] + this keepax
    python benchmarks/bench_gpu.py --cpu       # the same measurements on CPU JAX (to test it)
    python benchmarks/bench_gpu.py --python .venv/bin/python --cpu   # an existing env, no venv

Unless ``--python`` is given, it creates a venv (``--venv``, by default under
``~/.cache/keepax/``; reused when it exists) holding ``jax[cuda12]`` (``jax`` with ``--cpu``)
and this checkout's dependencies (``pip install <checkout>``), then runs the measurements in it
with this checkout's ``src/`` first on ``PYTHONPATH``, so the sources measured are the ones
here.

It builds a state of ``--gib`` GiB on the first device (32 float32 matrices and 64 small
vectors, random) and measures, ``--repeats`` times in rotating order, medians reported (each
save reads a fresh on-device clone of the state, made outside the timed region, so that no
host copy cached by an earlier read is reused):

- ``d2h``: one device-to-host copy of the state (``copy_to_host_async`` on every leaf, then
  ``np.asarray``; on CPU, where that is a zero-copy view, ``np.array(x, copy=True)``): the
  reference for blocking; ``d2h_pinned``: the same into the device's
  ``pinned_host`` memory kind (one batched ``jax.device_put``), for information;
- ``d2h_write``: that copy then a raw write + fsync of the bytes into 4 files by 4 threads:
  the reference for the commit;
- ``keepax.save`` (synchronous), and ``keepax.save_async`` with each staging way (``default``:
  pinned host staging where offered, or on CPU views of computed arrays; ``host``;
  ``pinned``): the time it blocks and the time until committed;
- ``read_h2d``: a cold read of the raw files into host memory (4 threads) then
  ``jax.device_put`` onto the device: the reference for restore; ``restore``: a cold
  ``keepax.restore(path, like)`` of a checkpoint of the state, ``like`` the state's
  ``jax.ShapeDtypeStruct``s with their shardings. Files are evicted from the page cache
  (``posix_fadvise(DONTNEED)`` after an fsync; also ``drop_caches`` when writable).

Prints a JSON document (also ``<dir>/gpu.json``) and a Markdown table (``<dir>/gpu.md``) with
the targets: blocking <= 1.1 x d2h, commit <= 1.1 x d2h_write, restore <= 1.1 x read_h2d.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.1
STAGING_WAYS = ("default", "host", "pinned")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: the venv, then the worker.


def ensure_venv(args: argparse.Namespace) -> str:
    """The venv's python, creating the venv (and installing into it) when missing."""
    kind = "cpu" if args.cpu else "cuda12"
    venv = args.venv or os.path.join(os.path.expanduser("~"), ".cache", "keepax",
                                     f"bench-gpu-venv-{kind}")
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".keepax-bench-ready")
    if os.path.exists(marker):
        return python
    log(f"creating {venv} (jax{'' if args.cpu else '[cuda12]'} + keepax's dependencies)")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    jax_req = "jax" if args.cpu else "jax[cuda12]"
    subprocess.run([python, "-m", "pip", "install", "--quiet", jax_req, REPO], check=True)
    with open(marker, "w") as f:
        f.write("ok\n")
    return python


def run_parent(args: argparse.Namespace) -> int:
    python = args.python or ensure_venv(args)
    os.makedirs(args.dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(REPO, "src"),
                                                      env.get("PYTHONPATH")]))
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [python, os.path.abspath(__file__), "--_worker", "--gib", str(args.gib),
           "--repeats", str(args.repeats), "--dir", args.dir] + (["--cpu"] if args.cpu else [])
    began = time.perf_counter()
    code = subprocess.run(cmd, env=env).returncode
    log(f"finished in {time.perf_counter() - began:.0f} s (exit {code})")
    return code


# ---------------------------------------------------------------------------------------------
# Worker: the measurements, in the venv.


def evict(directory: str) -> None:
    """Drops a directory's files from the page cache (they are fsynced first)."""
    for base, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if os.access("/proc/sys/vm/drop_caches", os.W_OK):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def split(items: list[Any], n: int) -> list[list[int]]:
    """Indices of ``items`` (byte views or arrays) spread over ``n`` groups of about equal size."""
    groups: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(items)), key=lambda i: -items[i].nbytes):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += items[i].nbytes
    return groups


def raw_write(arrays: list[Any], directory: str) -> None:
    """Every array's bytes into 4 files by 4 threads, each fsynced, then the directory."""
    import numpy as np

    os.makedirs(directory)
    groups = split(arrays, 4)

    def write(g: int) -> None:
        fd = os.open(os.path.join(directory, f"raw-{g}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in groups[g]:
                view = memoryview(np.ascontiguousarray(arrays[i]).reshape(-1).view(np.uint8))
                while len(view):
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def raw_read(templates: list[Any], directory: str) -> list[Any]:
    """Reads back what :func:`raw_write` wrote of arrays shaped like ``templates``."""
    import numpy as np

    outs = [np.empty(t.shape, t.dtype) for t in templates]
    groups = split(outs, 4)

    def read(g: int) -> None:
        with open(os.path.join(directory, f"raw-{g}.bin"), "rb", buffering=0) as f:
            for i in groups[g]:
                view = memoryview(outs[i].reshape(-1).view(np.uint8))
                while len(view):
                    n = f.readinto(view)
                    if not n:
                        raise OSError(f"raw-{g}.bin ended early")
                    view = view[n:]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(read, range(4)))
    return outs


def build_state(gib: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    rows = max(1, int(gib * (1 << 30) / 32 / 4 / 4096))
    make = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32) * 0.02,
                   static_argnums=1)
    keys = jax.random.split(jax.random.key(0), 96)
    state = {"layers": [{"w": make(keys[i], (rows, 4096)),
                         "b": make(keys[32 + i], (1024,)), "g": make(keys[64 + i], (1024,))}
                        for i in range(32)]}
    return jax.block_until_ready(state)


def worker(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import keepax
    from keepax._src.async_engine import staging as async_staging

    device = jax.devices()[0]
    if not args.cpu and device.platform != "gpu":
        log(f"no GPU: JAX's first device is {device} (run with --cpu to measure on CPU)")
        return 2
    kinds = sorted(m.kind for m in device.addressable_memories())
    root = os.path.join(args.dir, "gpu-work")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    state = build_state(args.gib)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    nbytes = sum(x.nbytes for x in leaves)
    log(f"{device}: {len(leaves)} arrays, {nbytes / (1 << 20):.0f} MiB; memory kinds {kinds}")
    pinned = (jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
              if "pinned_host" in kinds else None)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
    defaults = (async_staging._CPU_STAGING, async_staging._ACCELERATOR_STAGING)
    times: dict[str, list[float]] = {}

    def fresh() -> list[Any]:
        return jax.block_until_ready([x.copy() for x in leaves])

    def note(op: str, seconds: float) -> None:
        times.setdefault(op, []).append(seconds)
        log(f"  {op:<24s} {seconds:8.3f} s")

    def d2h(arrays: list[Any]) -> list[Any]:
        if device.platform == "cpu":  # np.asarray would be a zero-copy view: copy instead
            return [np.array(x, copy=True) for x in arrays]
        for x in arrays:
            x.copy_to_host_async()
        return [np.asarray(x) for x in arrays]

    def run_d2h(r: int) -> None:
        arrays = fresh()
        t = time.perf_counter()
        d2h(arrays)
        note("d2h", time.perf_counter() - t)
        if pinned is not None:
            arrays = fresh()
            t = time.perf_counter()
            jax.block_until_ready(jax.device_put(arrays, [pinned] * len(arrays)))
            note("d2h_pinned", time.perf_counter() - t)

    def run_d2h_write(r: int) -> None:
        arrays = fresh()
        path = os.path.join(root, f"raw-{r}")
        t = time.perf_counter()
        raw_write(d2h(arrays), path)
        note("d2h_write", time.perf_counter() - t)
        if r:
            shutil.rmtree(path)  # the first is kept for the reads

    def run_sync(r: int) -> None:
        tree = jax.tree_util.tree_unflatten(treedef, fresh())
        path = os.path.join(root, f"sync-{r}")
        t = time.perf_counter()
        keepax.save(path, tree)
        note("save", time.perf_counter() - t)
        if r:
            shutil.rmtree(path)  # the first is kept for the restores

    def run_async(way: str) -> Any:
        def run(r: int) -> None:
            async_staging._CPU_STAGING, async_staging._ACCELERATOR_STAGING = (
                defaults if way == "default" else (
                    ("host", "host") if way == "host" else ("pinned_host", "pinned_host")))
            tree = jax.tree_util.tree_unflatten(treedef, fresh())
            path = os.path.join(root, f"async-{way}-{r}")
            try:
                t = time.perf_counter()
                handle = keepax.save_async(path, tree)
                blocked = time.perf_counter() - t
                handle.wait()
                total = time.perf_counter() - t
            finally:
                async_staging._CPU_STAGING, async_staging._ACCELERATOR_STAGING = defaults
            note(f"async_{way}_blocking", blocked)
            note(f"async_{way}_commit", total)
            shutil.rmtree(path)
        return run

    def run_read_h2d(r: int) -> None:
        evict(os.path.join(root, "raw-0"))
        t = time.perf_counter()
        hosts = raw_read(leaves, os.path.join(root, "raw-0"))
        jax.block_until_ready(jax.device_put(hosts, device))
        note("read_h2d", time.perf_counter() - t)

    def run_restore(r: int) -> None:
        evict(os.path.join(root, "sync-0"))
        t = time.perf_counter()
        jax.block_until_ready(keepax.restore(os.path.join(root, "sync-0"), like))
        note("restore", time.perf_counter() - t)

    keepax.save_async(os.path.join(root, "warm"), {"x": leaves[-1]}).wait()  # imports, threads
    saves = [run_d2h, run_d2h_write, run_sync] + [run_async(w) for w in STAGING_WAYS]
    reads = [run_read_h2d, run_restore]
    for systems in (saves, reads):
        for r in range(args.repeats):
            k = r % len(systems)
            log(f"repeat {r + 1}/{args.repeats}")
            for run in systems[k:] + systems[:k]:
                run(r)
    shutil.rmtree(root, ignore_errors=True)
    result = report(args, device, kinds, len(leaves), nbytes, times)
    print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
    print(result["markdown"])
    with open(os.path.join(args.dir, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.dir, "gpu.md"), "w") as f:
        f.write(result["markdown"])
    return 0


def report(args: argparse.Namespace, device: Any, kinds: list[str], arrays: int, nbytes: int,
           times: dict[str, list[float]]) -> dict[str, Any]:
    import jax

    med = {op: statistics.median(v) for op, v in times.items()}
    rows = [(op, med[op], min(v), max(v)) for op, v in times.items()]
    checks = []
    for way in STAGING_WAYS:
        checks.append((f"save_async blocking ({way}) / d2h", f"async_{way}_blocking", "d2h"))
        checks.append((f"save_async commit ({way}) / d2h_write", f"async_{way}_commit",
                       "d2h_write"))
    checks.append(("restore / read_h2d", "restore", "read_h2d"))
    checks.append(("save / d2h_write (info)", "save", "d2h_write"))
    ratios = [(label, med[a] / med[b]) for label, a, b in checks if a in med and b in med]
    lines = [f"## keepax on {device.platform} ({device.device_kind}), "
             f"{nbytes / (1 << 30):.2f} GiB in {arrays} arrays, medians of {args.repeats}",
             f"\njax {jax.__version__}; memory kinds {kinds}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
             "| operation | median s | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {op} | {m:.3f} | {lo:.3f} | {hi:.3f} |" for op, m, lo, hi in rows]
    lines += ["", "| ratio (of medians) | value | target |", "|---|---:|---|"]
    for label, value in ratios:
        goal = "" if "info" in label else (
            f"<= {TARGET} **{'PASS' if value <= TARGET else 'MISS'}**")
        lines.append(f"| {label} | {value:.3f} | {goal} |")
    return {"device": str(device), "platform": device.platform, "memory_kinds": kinds,
            "arrays": arrays, "bytes": nbytes, "repeats": args.repeats, "times": times,
            "medians": med, "ratios": dict(ratios), "target": TARGET,
            "markdown": "\n".join(lines) + "\n"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure on CPU JAX (no GPU needed)")
    p.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="repeats, medians reported (default 5)")
    p.add_argument("--dir", default="/tmp/keepax-bench-gpu", help="scratch and report directory")
    p.add_argument("--venv", help="the venv to create or reuse (default under ~/.cache/keepax)")
    p.add_argument("--python", help="run in this interpreter instead of a venv (jax installed)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dir = os.path.abspath(args.dir)
    return worker(args) if args._worker else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
