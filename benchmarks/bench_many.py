"""keepax on states of many small arrays, against the single-file formats that do well there.

States: ``10k`` (10,000 float32[256] arrays, 100 groups of 100, as in ``bench_core.py``) and
``100k`` (1,000 layers x 100 float32[64] arrays). Per repeat, in an order that rotates from
repeat to repeat:

- keepax: ``save`` (durable), the manifest's parse and validation (``Manifest.from_json`` of
  its bytes), ``restore(like)`` cold (after ``drop_caches`` when writable) and
  warm, ``restore()`` to NumPy, ``inspect``, ``verify``;
- safetensors (``safetensors.flax``): ``save_file`` + fsync of the file and the directory,
  ``load_file`` (which creates the ``jax.Array``s);
- flax msgpack: ``to_bytes`` written + fsynced, ``from_bytes`` + one batched
  ``jax.device_put`` (so that it too ends with ``jax.Array``s).

Prints medians (and µs per leaf) as JSON and as a Markdown table, written to ``--dir``::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_many.py --states 10k,100k --repeats 5

``--memory N`` adds the restore's peak extra RSS on the 10k state (N fresh processes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import keepax

DROP_CACHES = "/proc/sys/vm/drop_caches"


def build(name: str) -> dict[str, Any]:
    """The state: nested dicts of float32 jax.Arrays on the default device."""
    groups, per, elems = {"10k": (100, 100, 256), "100k": (1000, 100, 64)}[name]
    rng = np.random.default_rng(0)
    return {
        f"layer{g:04d}": {
            f"w{i:03d}": jnp.asarray(rng.normal(0, 0.02, elems).astype(np.float32))
            for i in range(per)
        }
        for g in range(groups)
    }


def drop_caches() -> bool:
    """Empties the page cache when allowed (root); returns whether it did."""
    if not os.access(DROP_CACHES, os.W_OK):
        return False
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")
    return True


def fsync_file(path: str) -> None:
    """Makes a file and its name durable (fsync of the file, then of its directory)."""
    fsync_file_dir(path)
    fsync_file_dir(os.path.dirname(path))


def fsync_file_dir(path: str) -> None:
    """fsyncs one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flat(state: dict[str, Any]) -> dict[str, Any]:
    return {f"{g}/{k}": v for g, sub in state.items() for k, v in sub.items()}


def systems(state: dict[str, Any], work: str) -> dict[str, list[tuple[str, Callable[[], Any]]]]:
    """Per system, its operations in order (each a fresh directory per repeat)."""
    from flax import serialization  # noqa: PLC0415
    from safetensors import flax as st  # noqa: PLC0415

    ck, sf, mp = f"{work}/keepax", f"{work}/st/model.safetensors", f"{work}/mp/state.msgpack"
    flat_state = flat(state)

    def keepax_save() -> None:
        shutil.rmtree(ck, ignore_errors=True)
        keepax.save(ck, state)

    def st_save() -> None:
        shutil.rmtree(os.path.dirname(sf), ignore_errors=True)
        os.makedirs(os.path.dirname(sf))
        st.save_file(flat_state, sf)
        fsync_file(sf)

    def mp_save() -> None:
        shutil.rmtree(os.path.dirname(mp), ignore_errors=True)
        os.makedirs(os.path.dirname(mp))
        with open(mp, "wb") as f:
            f.write(serialization.to_bytes(state))
            f.flush()
            os.fsync(f.fileno())
        fsync_file_dir(os.path.dirname(mp))

    def mp_restore() -> Any:
        with open(mp, "rb") as f:
            host = serialization.from_bytes(state, f.read())
        return jax.block_until_ready(jax.device_put(host))

    def manifest_parse() -> Any:
        from keepax._src.format.manifest import Manifest  # noqa: PLC0415

        with open(f"{ck}/manifest.json", "rb") as f:
            data = f.read()
        return Manifest.from_json(data, where=ck)

    like = lambda: jax.block_until_ready(keepax.restore(ck, like=state))  # noqa: E731
    return {
        "keepax": [
            ("save", keepax_save),
            ("manifest_parse", manifest_parse),
            ("restore_like_cold", like),
            ("restore_like_warm", like),
            ("restore_numpy", lambda: keepax.restore(ck)),
            ("inspect", lambda: keepax.inspect(ck)),
            ("verify", lambda: keepax.verify(ck)),
        ],
        "safetensors": [
            ("save", st_save),
            ("restore_cold", lambda: jax.block_until_ready(st.load_file(sf))),
        ],
        "flax_msgpack": [("save", mp_save), ("restore_cold", mp_restore)],
    }


def run_state(name: str, repeats: int, work: str) -> dict[str, Any]:
    state = build(name)
    leaves = len(jax.tree_util.tree_leaves(state))
    ops = systems(state, work)
    order = list(ops)
    times: dict[str, list[float]] = {}
    for system in order:  # warm-up: imports, JAX caches
        for _, fn in ops[system]:
            fn()
    for r in range(repeats):
        rotated = order[r % len(order):] + order[: r % len(order)]
        for system in rotated:
            for op, fn in ops[system]:
                if op.endswith("_cold"):
                    drop_caches()
                gc.collect()
                began = time.perf_counter()
                fn()
                times.setdefault(f"{system}.{op}", []).append(time.perf_counter() - began)
        print(f"[{name}] repeat {r + 1}/{repeats} done ({' -> '.join(rotated)})", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "leaves": leaves,
        "times": times,
        "medians": medians,
        "us_per_leaf": {k: v / leaves * 1e6 for k, v in medians.items()},
    }


def memory(work: str, repeats: int) -> dict[str, list[float]]:
    """Peak extra RSS (MiB) of ``restore(like)`` of the 10k state and of one batched
    ``jax.device_put`` of its host copies, each in a fresh process (``bench_core``'s memory
    worker, as in its reports), ``repeats`` times each."""
    import argparse as _argparse  # noqa: PLC0415

    import bench_core  # noqa: PLC0415

    ckpt = f"{work}/memory-ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    keepax.save(ckpt, bench_core.build_state("10k"))
    args = _argparse.Namespace(dir=work, repeats=1, no_orbax=True)
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for op in ("keepax_restore", "jax_device_put"):
            res = bench_core.run_worker(args, "memory", "10k", op=op, ckpt=ckpt)
            out.setdefault(op, []).append(res.get("extra_peak_mib", float("nan")))
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, res in result["states"].items():
        m, us = res["medians"], res["us_per_leaf"]
        lines += [f"### {name}: {res['leaves']} leaves, medians of {result['repeats']}", "",
                  "| operation | median s | µs / leaf |", "|---|---:|---:|"]
        lines += [f"| {k} | {m[k]:.3f} | {us[k]:.1f} |" for k in m]
        best_save = min(m["safetensors.save"], m["flax_msgpack.save"])
        best_restore = min(m["safetensors.restore_cold"], m["flax_msgpack.restore_cold"])
        lines += ["", f"keepax save / fastest peer save: {m['keepax.save'] / best_save:.2f}; "
                  f"keepax restore(like) cold / fastest peer restore: "
                  f"{m['keepax.restore_like_cold'] / best_restore:.2f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--states", default="10k", help="comma-separated: 10k, 100k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="bench_out/many")
    parser.add_argument("--memory", type=int, default=0, metavar="N",
                        help="also measure restore peak extra RSS, N fresh processes")
    args = parser.parse_args()
    work = os.path.abspath(args.dir)
    os.makedirs(work, exist_ok=True)
    result: dict[str, Any] = {
        "command": "bench_many.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": args.repeats,
        "cold": os.access(DROP_CACHES, os.W_OK),
        "cpus": os.cpu_count(),
        "states": {},
    }
    for name in [s for s in args.states.split(",") if s]:
        result["states"][name] = run_state(name, args.repeats, f"{work}/{name}")
        shutil.rmtree(f"{work}/{name}", ignore_errors=True)
    if args.memory:
        result["memory_mib"] = memory(work, args.memory)
        print("peak extra RSS, MiB:", json.dumps(result["memory_mib"]), flush=True)
    with open(f"{work}/many.json", "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(f"{work}/many.md", "w") as f:
        f.write(table + "\n")
    print(json.dumps({k: v["medians"] for k, v in result["states"].items()}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
