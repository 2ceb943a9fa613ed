#!/usr/bin/env python
"""keepax multi-process benchmark: 2 JAX processes on one machine save and restore a sharded state.

Issue #5's performance targets, measured in one run:

- keepax's aggregate save throughput (unique bytes / wall time until every process has
  returned) >= 0.8 x one process's raw write + fsync of the same bytes (4 files, 4 threads, as
  in ``bench_core.py``) into the same file system, while the other process waits at a barrier;
- on restore with ``like`` on the same mesh, the data bytes each process reads
  (``RestoreStats.bytes_read``) <= 1.1 x the bytes of the unique boxes of its addressable target
  shards (from ``sharding.addressable_devices_indices_map``); chunk tables and the manifest are
  reported separately;
- Orbax's ``StandardCheckpointer`` saving and restoring the same global arrays from the same
  two processes (an error is reported, not hidden).

Also measured for reference: both processes writing their halves concurrently with plain
``write`` + ``fsync`` (the disk's 2-writer aggregate), process 0's raw read of the 1-process files
(cold after ``drop_caches`` when writable, and warm), keepax and Orbax restores cold and warm,
and each process's ``/proc/self/io`` counters during restores (``rchar``: bytes returned by
read syscalls; ``read_bytes``: bytes fetched from the block device).

The parent starts 2 children of this script (``tests/multiproc.py``; each child has 2 CPU
devices, mesh data=2 x model=2, ``data`` being the process axis). Each repeat uses fresh
directories; the order of the systems rotates from repeat to repeat.

Usage::

    .venv/bin/python benchmarks/bench_multihost.py --gib 1 --repeats 3

``--reads`` runs the restore read-ratio scenarios instead (4 and 8 processes, resharding
8 -> 3 and 4 -> 8, a 2,000-array state; ``benchmarks/multihost_reads.py``)::

    .venv/bin/python benchmarks/bench_multihost.py --reads --mib 64

``--collectives`` times each collective of a save (the agreement and the three after it) at 2,
4 and 8 processes (``benchmarks/multihost_collectives.py``)::

    .venv/bin/python benchmarks/bench_multihost.py --collectives --repeats 5

Prints a JSON document (also ``<dir>/multihost.json``) then a Markdown summary
(``<dir>/multihost.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, "benchmarks")
TESTS_DIR = os.path.join(REPO, "tests")
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, TESTS_DIR)

import bench_core  # noqa: E402  (imports nothing heavy at module level)

MIB = 1 << 20
GIB = 1 << 30
NPROC = 2
DEVICES_PER_PROCESS = 2

TARGET_SAVE_VS_RAW = 0.8  # aggregate keepax save throughput / 1-process raw write+fsync
TARGET_READ_VS_NEEDED = 1.1  # per-process data bytes read / bytes of the shards it needs


log = bench_core.log


# ---------------------------------------------------------------------------------------------
# The state: (name, shape, PartitionSpec as a tuple of axis names / tuples / None).


def state_spec(gib: float) -> list[tuple[str, tuple[int, ...], tuple[Any, ...]]]:
    """A transformer-like state of about ``gib`` GiB: large float32 matrices sharded over the
    process axis ``data`` (and ``model`` within a process), one matrix sharded over ``model``
    only (replicated across processes), and small replicated vectors/scalars."""
    vocab, d = (32768, 2048) if gib >= 0.75 else (32768, 1024)
    ff, seq = 4 * d, 4 * d
    fixed = (2 * vocab * d + seq * d + d * 2 * d) * 4
    per_layer = (d * 3 * d + d * d + 2 * d * ff) * 4
    layers = max(1, round((gib * GIB - fixed) / per_layer))
    spec: list[tuple[str, tuple[int, ...], tuple[Any, ...]]] = [
        ("embed", (vocab, d), ("data", "model")),
        ("pos_embed", (seq, d), ("data",)),  # process-sharded, replicated within a process
        ("router", (d, 2 * d), (None, "model")),  # replicated across processes
    ]
    for i in range(layers):
        p = f"layer_{i:02d}/"
        spec += [
            (p + "attn/qkv", (d, 3 * d), ("data", "model")),
            (p + "attn/out", (d, d), ("model", "data")),
            (p + "mlp/wi", (d, ff), ("data", "model")),
            (p + "mlp/wi_bias", (ff,), ("model",)),
            (p + "mlp/wo", (ff, d), ("model", "data")),
            (p + "mlp/wo_bias", (d,), ()),
            (p + "ln/scale", (d,), ()),
            (p + "ln/bias", (d,), ()),
        ]
    spec += [
        ("final_ln/scale", (d,), ()),
        ("lm_head", (d, vocab), (None, ("data", "model"))),
        ("step", (), ()),
    ]
    return spec


def _seed(name: str, start: tuple[int, ...]) -> int:
    import zlib

    return zlib.crc32(f"{name}@{start}".encode())


def build_state(mesh: Any, spec: list[tuple[str, tuple[int, ...], tuple[Any, ...]]]) -> dict[str, Any]:
    """Global ``jax.Array``s; each box's values depend only on (leaf, box start)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    tree: dict[str, Any] = {}
    for name, shape, pspec in spec:
        sharding = NamedSharding(mesh, PartitionSpec(*pspec))
        cache: dict[tuple, Any] = {}

        def make(index: Any, name: str = name, shape: tuple[int, ...] = shape, cache: dict = cache) -> Any:
            box = tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(index, shape))
            if box not in cache:
                bshape = tuple(b - a for a, b in box)
                if name == "step":
                    cache[box] = np.array(1234, np.int32)
                else:
                    n = int(np.prod(bshape))
                    buf = bench_core._aligned_empty(n, np.float32)
                    rng = np.random.default_rng(_seed(name, tuple(a for a, _ in box)))
                    block = 16 << 20
                    for i in range(0, n, block):
                        rng.standard_normal(dtype=np.float32, out=buf[i : i + block])
                    buf *= np.float32(0.02)
                    cache[box] = buf.reshape(bshape)
            return cache[box]

        tree[name] = jax.make_array_from_callback(shape, sharding, make)
    jax.block_until_ready(tree)
    return tree


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (the trees saved and restored are nested dicts)."""
    tree: dict[str, Any] = {}
    for name, x in flat.items():
        node = tree
        *parents, last = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = x
    return tree


def unnest(tree: dict[str, Any], names: Any) -> dict[str, Any]:
    out = {}
    for name in names:
        node = tree
        for k in name.split("/"):
            node = node[k]
        out[name] = node
    return out


def _box_of(index: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(index, shape))


def needed_bytes(tree: dict[str, Any]) -> dict[str, int]:
    """Per leaf: bytes of the unique boxes this process's addressable shards hold."""
    import numpy as np

    out = {}
    for name, x in tree.items():
        boxes = {_box_of(idx, x.shape) for idx in x.sharding.addressable_devices_indices_map(x.shape).values()}
        out[name] = sum(int(np.prod([b - a for a, b in box])) * x.dtype.itemsize for box in boxes)
    return out


def local_unique_views(tree: dict[str, Any]) -> list[memoryview]:
    """Zero-copy byte views of this process's unique shards (one per box)."""
    import numpy as np

    views, seen = [], set()
    for name, x in tree.items():
        for shard in x.addressable_shards:
            key = (name, _box_of(shard.index, x.shape))
            if key in seen:
                continue
            seen.add(key)
            views.append(memoryview(np.asarray(shard.data).reshape(-1).view(np.uint8)))
    return views


def views_of_total(views: list[memoryview], total: int) -> list[memoryview]:
    """Byte views adding up to exactly ``total``, cycling through ``views`` (largest first)."""
    src = sorted(views, key=len, reverse=True)
    out, left, i = [], total, 0
    while left > 0:
        v = src[i % len(src)]
        take = v[: min(len(v), left)]
        out.append(take)
        left -= len(take)
        i += 1
    return out


raw_write_views = bench_core.raw_write_views


def proc_io() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def io_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in ("rchar", "read_bytes") if k in a and k in b}


def dir_sizes(path: str) -> dict[str, int]:
    """Bytes of a checkpoint directory: data files, chunk tables / other files, manifest."""
    data = other = manifest = 0
    for base, _, files in os.walk(path):
        for f in files:
            size = os.path.getsize(os.path.join(base, f))
            if f == "manifest.json":
                manifest += size
            elif f.endswith(".safetensors"):
                data += size
            else:
                other += size
    return {"data": data, "other": other, "manifest": manifest, "total": data + other + manifest}


# ---------------------------------------------------------------------------------------------
# Child: one of the 2 JAX processes.


def child_main(args: argparse.Namespace) -> int:
    import mp_prelude  # noqa: I001 - before jax: sets XLA_FLAGS, the excepthook

    index, count = mp_prelude.init()

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import keepax

    P0 = index == 0
    plog = mp_prelude.log
    mesh = mp_prelude.global_mesh((count, DEVICES_PER_PROCESS), ("data", "model"))
    spec = state_spec(args.gib)
    t0 = time.perf_counter()
    state = build_state(mesh, spec)
    build_s = time.perf_counter() - t0
    unique = sum(int(x.nbytes) for x in state.values())
    need = needed_bytes(state)
    local_views = local_unique_views(state)
    local_bytes = sum(len(v) for v in local_views)
    plog(f"built {len(state)} arrays, {unique / MIB:.1f} MiB global, {local_bytes / MIB:.1f} MiB "
         f"local unique, needs {sum(need.values()) / MIB:.1f} MiB, in {build_s:.1f} s")
    flat_like = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in state.items()}
    like, tree = nest(flat_like), nest(state)
    cold = P0 and bench_core.can_drop_caches()
    cold = bool(multihost_utils.broadcast_one_to_all(np.int32(cold)))
    root = args.dir

    ocp, orbax_note = (None, "Orbax disabled (--no-orbax)") if args.no_orbax else bench_core.import_orbax()
    ckptr = ocp.StandardCheckpointer() if ocp is not None else None

    nbar = [0]

    def barrier() -> None:
        nbar[0] += 1
        multihost_utils.sync_global_devices(f"bench-{nbar[0]}")

    def drop() -> None:
        if cold and P0:
            bench_core.drop_caches()
        barrier()

    def check(restored: dict[str, Any], what: str) -> None:
        restored = unnest(restored, state)
        for name, x in state.items():
            got = restored[name]
            assert isinstance(got, jax.Array), (what, name)
            assert got.sharding.is_equivalent_to(x.sharding, x.ndim), (what, name)
            want = {s.device: s for s in x.addressable_shards}
            for s in got.addressable_shards:
                w = want[s.device]
                assert s.index == w.index, (what, name)
                a, b = np.asarray(s.data), np.asarray(w.data)
                assert a.dtype == b.dtype and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)), (what, name)

    result: dict[str, Any] = {
        "index": index, "count": count, "devices": [d.id for d in jax.local_devices()],
        "mesh": dict(mesh.shape), "arrays": len(state), "unique_bytes": unique,
        "local_unique_bytes": local_bytes, "needed_bytes": sum(need.values()),
        "needed_by_leaf": need, "build_seconds": build_s, "cold": cold,
        "orbax_note": orbax_note, "orbax_errors": [], "repeats": [],
        "specs": {n: [list(s), [list(a) if isinstance(a, tuple) else a for a in p]] for n, s, p in spec},
    }

    def timed(fn: Any) -> tuple[float, float, Any]:
        """Barrier, then (start, end) on CLOCK_MONOTONIC (shared by the processes of one machine)."""
        bench_core.settle()
        barrier()
        start = time.monotonic()
        out = fn()
        end = time.monotonic()
        return start, end, out

    def run_raw(r: int, rec: dict[str, Any]) -> None:
        one = views_of_total(local_views, unique)
        variants = [("raw_write_1p", None), ("raw_write_1p_64m", 64 * MIB)]
        if r % 2:
            variants.reverse()
        path = os.path.join(root, f"raw-{r}-p{index}")
        for op, piece in variants:
            d = path + ("-64m" if piece else "")
            start, end, _ = timed(lambda: raw_write_views(one, d, piece=piece) if P0 else None)
            rec[op] = [start, end] if P0 else None
            barrier()
            if P0 and piece:
                bench_core.remove(d)
        # process 0 reads its 1-process files back: cold (if possible) and warm.
        reads = [("raw_read_1p", None), ("raw_read_1p_ranges", 16 * MIB)]
        for phase in (["cold"] if cold else []) + ["warm"]:
            for op, piece in reads:
                if phase == "cold":
                    drop()
                start, end, _ = timed(lambda: bench_core.raw_read(path, piece=piece) if P0 else None)
                rec[f"{op}_{phase}"] = [start, end] if P0 else None
        barrier()
        if P0:
            bench_core.remove(path)
        # both processes write half of the bytes each, at the same time.
        half = views_of_total(local_views, unique // count)
        d2 = os.path.join(root, f"raw2-{r}-p{index}")
        start, end, _ = timed(lambda: raw_write_views(half, d2))
        rec["raw_write_2p"] = [start, end]
        barrier()
        bench_core.remove(d2)

    def run_keepax(r: int, rec: dict[str, Any]) -> None:
        path = os.path.join(root, f"keepax-{r}")
        start, end, saved = timed(lambda: keepax.save(path, tree))
        rec["keepax_save"] = [start, end]
        rec["keepax_bytes_written"] = saved.bytes_written
        rec["keepax_files"] = saved.files
        barrier()
        rec["keepax_dir"] = dir_sizes(path) if P0 else None
        rec["keepax_manifest_bytes"] = os.path.getsize(os.path.join(path, "manifest.json"))
        for phase in (["cold"] if cold else []) + ["warm"]:
            if phase == "cold":
                drop()
            stats = keepax.RestoreStats()
            io0 = proc_io()
            start, end, out = timed(lambda: jax.block_until_ready(keepax.restore(path, like, stats=stats)))
            io1 = proc_io()
            rec[f"keepax_restore_{phase}"] = [start, end]
            rec[f"keepax_restore_{phase}_stats"] = {
                "bytes_read": stats.bytes_read, "table_bytes_read": stats.table_bytes_read,
                "chunks_read": stats.chunks_read, "files_opened": stats.files_opened,
                "io": io_delta(io0, io1)}
            check(out, f"keepax restore {phase}")
            del out
        if r == 0:  # which leaves read what: one partial restore per leaf (warm)
            per_leaf = {}
            for name in state:
                stats = keepax.RestoreStats()
                out = keepax.restore(path, nest({name: flat_like[name]}), partial=True, stats=stats)
                jax.block_until_ready(out)
                per_leaf[name] = {"bytes_read": stats.bytes_read, "table_bytes_read": stats.table_bytes_read,
                                  "needed": need[name]}
                del out
            rec["keepax_per_leaf"] = per_leaf
        barrier()
        if P0:
            bench_core.remove(path)
        barrier()

    def run_orbax(r: int, rec: dict[str, Any]) -> None:
        if ckptr is None or result["orbax_errors"]:
            return
        path = os.path.join(root, f"orbax-{r}")
        stage = "save"
        try:
            def save() -> float:
                s = time.monotonic()
                ckptr.save(path, tree)
                blocked = time.monotonic() - s
                ckptr.wait_until_finished()
                return blocked

            start, end, blocked = timed(save)
            rec["orbax_save"] = [start, end]
            rec["orbax_save_blocking"] = blocked
            barrier()
            rec["orbax_dir"] = dir_sizes(path) if P0 else None
            for phase in (["cold"] if cold else []) + ["warm"]:
                stage = f"restore {phase}"
                if phase == "cold":
                    drop()
                io0 = proc_io()
                start, end, out = timed(lambda: jax.block_until_ready(ckptr.restore(path, like)))
                io1 = proc_io()
                rec[f"orbax_restore_{phase}"] = [start, end]
                rec[f"orbax_restore_{phase}_io"] = io_delta(io0, io1)
                check(out, f"orbax restore {phase}")
                del out
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            text = f"{stage}: {type(e).__name__}: {e}"
            plog("Orbax FAILED:", text)
            traceback.print_exc()
            result["orbax_errors"].append({"repeat": r, "error": text[:4000]})
            mp_prelude.report(result)
            return
        barrier()
        if P0:
            bench_core.remove(path)
        barrier()

    systems = [("raw", run_raw), ("keepax", run_keepax), ("orbax", run_orbax)]
    for r in range(args.repeats):
        k = r % len(systems)
        order = systems[k:] + systems[:k]
        rec: dict[str, Any] = {"order": [s for s, _ in order]}
        plog(f"repeat {r + 1}/{args.repeats}: {' -> '.join(rec['order'])}")
        for name, fn in order:
            fn(r, rec)
            spans = {op: v for op, v in rec.items() if isinstance(v, list) and len(v) == 2
                     and all(isinstance(t, float) for t in v)}
            plog("  " + ", ".join(f"{op} {v[1] - v[0]:.3f}s" for op, v in spans.items()
                                  if op.startswith(name)))
        rec["loadavg"] = os.getloadavg()
        result["repeats"].append(rec)
        mp_prelude.report(result)
    if ckptr is not None:
        ckptr.close()
    barrier()
    mp_prelude.report(result)
    plog("done")
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: start the children, combine their results.


def run_children(args: argparse.Namespace, work: str) -> list[Any]:
    from multiproc import describe_all, start_processes

    cargs = ["--child", "--gib", str(args.gib), "--repeats", str(args.repeats), "--dir", work]
    if args.no_orbax:
        cargs.append("--no-orbax")
    timeout = args.timeout or (240 + 150 * args.gib * args.repeats)
    with start_processes(os.path.abspath(__file__), NPROC, tmp_path=work, args=cargs,
                         devices_per_process=DEVICES_PER_PROCESS) as group:
        shown = [0] * NPROC
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(NPROC):
                text = group.output(i)
                if len(text) > shown[i]:
                    for line in text[shown[i]:].splitlines():
                        if line.startswith("[") or "Error" in line or "FAILED" in line:
                            log(line)
                    shown[i] = len(text)
            if all(group.poll(i) is not None for i in range(NPROC)):
                break
            if any(group.poll(i) not in (None, 0) for i in range(NPROC)):
                break
            time.sleep(0.2)
        results = group.wait(max(1.0, deadline - time.monotonic()))
    if not all(r.ok for r in results):
        log(describe_all(results))
    return results


def _span(recs: list[dict[str, Any]], op: str) -> float | None:
    """Aggregate wall time of ``op`` in one repeat: last end - first start over the processes."""
    spans = [r[op] for r in recs if isinstance(r.get(op), list)]
    if not spans:
        return None
    return max(e for _, e in spans) - min(s for s, _ in spans)


def summarize(values: list[float]) -> dict[str, Any]:
    return bench_core.summarize(values) if values else {}


OPS = [
    ("raw_write_1p", "raw write + fsync, process 0 alone: 4 files, 4 threads, writev whole shards"),
    ("raw_write_1p_64m", "raw write + fsync, process 0 alone: 4 files, 4 threads, 64 MiB writes"),
    ("raw_write_2p", "raw write + fsync, both processes at once, half the bytes each (writev)"),
    ("keepax_save", "**keepax.save**, 2 processes (until both return)"),
    ("orbax_save", "Orbax save, 2 processes (until both `wait_until_finished`)"),
    ("raw_read_1p_cold", "raw read cold, process 0 alone, 1 preadv per file"),
    ("raw_read_1p_ranges_cold", "raw read cold, process 0 alone, 16 MiB ranges x 8 threads"),
    ("raw_read_1p_warm", "raw read warm, process 0 alone, 1 preadv per file"),
    ("raw_read_1p_ranges_warm", "raw read warm, process 0 alone, 16 MiB ranges x 8 threads"),
    ("keepax_restore_cold", "**keepax.restore(like)**, cold, 2 processes"),
    ("keepax_restore_warm", "**keepax.restore(like)**, warm, 2 processes"),
    ("orbax_restore_cold", "Orbax restore, cold, 2 processes"),
    ("orbax_restore_warm", "Orbax restore, warm, 2 processes"),
]


def analyse(children: list[dict[str, Any]]) -> dict[str, Any]:
    nrep = min(len(c["repeats"]) for c in children)
    unique = children[0]["unique_bytes"]
    times: dict[str, list[float]] = {}
    for r in range(nrep):
        recs = [c["repeats"][r] for c in children]
        for op, _ in OPS:
            v = _span(recs, op)
            if v is not None:
                times.setdefault(op, []).append(v)
    stats = {op: summarize(v) for op, v in times.items()}
    blocking = [max(c["repeats"][r].get("orbax_save_blocking", 0.0) for c in children)
                for r in range(nrep) if "orbax_save_blocking" in children[0]["repeats"][r]]
    if blocking:
        stats["orbax_save_blocking"] = summarize(blocking)
    raw_best = None
    present = [v for v in ("raw_write_1p", "raw_write_1p_64m") if times.get(v)]
    if present:
        raw_best = min(present, key=lambda v: statistics.median(times[v]))
    raw_read_best = {}
    for phase in ("cold", "warm"):
        cand = [v for v in (f"raw_read_1p_{phase}", f"raw_read_1p_ranges_{phase}") if times.get(v)]
        if cand:
            raw_read_best[phase] = min(cand, key=lambda v: statistics.median(times[v]))

    def ratio(a: str, b: str | None) -> dict[str, Any]:
        """a's time / b's time: of medians and per repeat."""
        if not b or not times.get(a) or not times.get(b) or len(times[a]) != len(times[b]):
            return {}
        per = [x / y for x, y in zip(times[a], times[b])]
        return {"of_medians": statistics.median(times[a]) / statistics.median(times[b]),
                "per_repeat": per, "median_of_paired": statistics.median(per), "baseline": b}

    ratios = {
        # throughput ratio = raw time / keepax time (>= 0.8 wanted)
        "keepax save throughput / raw 1-process write+fsync": _inverse(ratio("keepax_save", raw_best)),
        "keepax save throughput / raw 2-process write+fsync": _inverse(ratio("keepax_save", "raw_write_2p")),
        "Orbax save throughput / raw 1-process write+fsync": _inverse(ratio("orbax_save", raw_best)),
        "Orbax save time / keepax save time": ratio("orbax_save", "keepax_save"),
        "keepax restore cold / raw 1-process cold read": ratio("keepax_restore_cold", raw_read_best.get("cold")),
        "Orbax restore time / keepax restore time, cold": ratio("orbax_restore_cold", "keepax_restore_cold"),
        "Orbax restore time / keepax restore time, warm": ratio("orbax_restore_warm", "keepax_restore_warm"),
    }
    # bytes read per process
    reads = []
    for c in children:
        for r, rec in enumerate(c["repeats"][:nrep]):
            for phase in ("cold", "warm"):
                s = rec.get(f"keepax_restore_{phase}_stats")
                if not s:
                    continue
                need = c["needed_bytes"]
                manifest = rec.get("keepax_manifest_bytes", 0)
                reads.append({
                    "process": c["index"], "repeat": r, "phase": phase, "needed": need,
                    "bytes_read": s["bytes_read"], "table_bytes_read": s["table_bytes_read"],
                    "manifest_bytes": manifest, "chunks_read": s["chunks_read"],
                    "data_ratio": s["bytes_read"] / need,
                    "with_tables_ratio": (s["bytes_read"] + s["table_bytes_read"]) / need,
                    "rchar": s["io"].get("rchar"), "read_bytes": s["io"].get("read_bytes"),
                    "orbax_rchar": (rec.get(f"orbax_restore_{phase}_io") or {}).get("rchar"),
                    "orbax_read_bytes": (rec.get(f"orbax_restore_{phase}_io") or {}).get("read_bytes"),
                })
    over = []
    for c in children:
        for name, v in (c["repeats"][0].get("keepax_per_leaf") or {}).items():
            if v["bytes_read"] > TARGET_READ_VS_NEEDED * v["needed"] or v["bytes_read"] < v["needed"]:
                over.append({"process": c["index"], "leaf": name, **v})
    throughput = {op: unique / s["median"] / 1e9 for op, s in stats.items() if s.get("median") and op != "orbax_save_blocking"}
    return {"repeats": nrep, "times": times, "stats": stats, "throughput_gb_s": throughput,
            "raw_write_baseline": raw_best, "raw_read_baseline": raw_read_best, "ratios": ratios,
            "reads": reads, "per_leaf_outside_target": over}


def _inverse(r: dict[str, Any]) -> dict[str, Any]:
    if not r:
        return r
    return {"of_medians": 1 / r["of_medians"], "per_repeat": [1 / x for x in r["per_repeat"]],
            "median_of_paired": statistics.median(1 / x for x in r["per_repeat"]), "baseline": r["baseline"]}


def targets(an: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    save = an["ratios"]["keepax save throughput / raw 1-process write+fsync"]
    if save:
        v = save["of_medians"]
        rows.append({"target": "aggregate keepax save throughput / 1-process raw write+fsync",
                     "value": v, "goal": f">= {TARGET_SAVE_VS_RAW}",
                     "status": "PASS" if v >= TARGET_SAVE_VS_RAW else "MISS",
                     "per_repeat": save["per_repeat"]})
    if an["reads"]:
        worst = max(an["reads"], key=lambda x: x["data_ratio"])
        rows.append({"target": "per-process data bytes read / bytes of the shards it needs (worst)",
                     "value": worst["data_ratio"], "goal": f"<= {TARGET_READ_VS_NEEDED}",
                     "status": "PASS" if worst["data_ratio"] <= TARGET_READ_VS_NEEDED else "MISS"})
        worst_t = max(an["reads"], key=lambda x: (x["bytes_read"] + x["table_bytes_read"])
                      - TARGET_READ_VS_NEEDED * x["needed"] - x["manifest_bytes"])
        excess = (worst_t["bytes_read"] + worst_t["table_bytes_read"]
                  - TARGET_READ_VS_NEEDED * worst_t["needed"] - worst_t["manifest_bytes"])
        rows.append({"target": "per-process (data + chunk tables) <= 1.1 x needed + manifest (worst)",
                     "value": worst_t["with_tables_ratio"],
                     "goal": "<= 1.1 + manifest/needed",
                     "status": "PASS" if excess <= 0 else "MISS"})
    return rows


fmt = bench_core.fmt


def markdown(result: dict[str, Any]) -> str:
    out = []
    m = result["machine"]
    an = result.get("analysis")
    out.append(f"## keepax multi-process benchmark ({NPROC} processes) — {m['date_utc']}\n")
    out.append(f"keepax commit {m['keepax_commit']}, src sha256 {m['keepax_src_sha256']}; "
               f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['filesystem']}, "
               f"Linux {m['kernel']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + "\n")
    for note in result["notes"]:
        out.append(f"Note: {note}\n")
    if not an:
        return "\n".join(out) + "\n"
    st = result["state"]
    out.append(f"State: {st['arrays']} arrays, {st['unique_bytes'] / MIB:.1f} MiB of unique bytes, "
               f"mesh {st['mesh']} ({NPROC} processes x {DEVICES_PER_PROCESS} CPU devices); each process "
               f"holds {st['local_unique_bytes'] / MIB:.1f} MiB of unique shards and needs "
               f"{st['needed_bytes'] / MIB:.1f} MiB on restore. {an['repeats']} repeats; times are "
               "aggregate (last process's end - first process's start, after a barrier).\n")
    out.append("| operation | median s | min s | max s | GB/s (unique bytes / median) |")
    out.append("|---|---:|---:|---:|---:|")
    for op, label in OPS + [("orbax_save_blocking", "Orbax save, blocking part (slowest process)")]:
        s = an["stats"].get(op)
        if s:
            out.append(f"| {label} | {fmt(s['median'])} | {fmt(s['min'])} | {fmt(s['max'])} | "
                       f"{fmt(an['throughput_gb_s'].get(op))} |")
    out.append("")
    out.append("| ratio | of medians | per repeat | baseline |")
    out.append("|---|---:|---|---|")
    for label, r in an["ratios"].items():
        if r:
            out.append(f"| {label} | {fmt(r['of_medians'])} | {', '.join(f'{x:.2f}' for x in r['per_repeat'])} "
                       f"| {r['baseline']} |")
    out.append("")
    out.append("| restore reads, per process | needed MiB | data read MiB | ratio | chunk tables KiB "
               "| manifest KiB | rchar MiB | device reads MiB | Orbax rchar MiB | Orbax device reads MiB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in an["reads"]:
        def mib(v: int | None) -> str:
            return "—" if v is None else f"{v / MIB:.1f}"
        out.append(f"| process {x['process']}, repeat {x['repeat'] + 1}, {x['phase']} | {mib(x['needed'])} | "
                   f"{mib(x['bytes_read'])} | {x['data_ratio']:.3f} | {x['table_bytes_read'] / 1024:.1f} | "
                   f"{x['manifest_bytes'] / 1024:.1f} | {mib(x['rchar'])} | {mib(x['read_bytes'])} | "
                   f"{mib(x['orbax_rchar'])} | {mib(x['orbax_read_bytes'])} |")
    out.append("")
    if an["per_leaf_outside_target"]:
        out.append("Leaves restored alone (partial restore) that read outside [1, 1.1] x needed:\n")
        for x in an["per_leaf_outside_target"]:
            out.append(f"- process {x['process']} `{x['leaf']}`: read {x['bytes_read']} B, needed {x['needed']} B")
        out.append("")
    else:
        out.append("Every leaf restored alone (partial restore, repeat 1) read between 1.0 and 1.1 x the "
                   "bytes its shards need.\n")
    out.append("### Targets\n")
    out.append("| target | value | goal | result |")
    out.append("|---|---:|---|---|")
    for row in result["targets"]:
        out.append(f"| {row['target']} | {fmt(row['value'])} | {row['goal']} | **{row['status']}** |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0,
                   help="state size in GiB (default 1; below 0.75 the layout shrinks, minimum ~0.3 GiB)")
    p.add_argument("--repeats", type=int, default=3, help="repeats (default 3)")
    p.add_argument("--dir", default=os.path.join(REPO, "bench_out"),
                   help="where checkpoints and multihost.json go (default bench_out/, git-ignored)")
    p.add_argument("--no-orbax", action="store_true", help="skip Orbax")
    p.add_argument("--keep", action="store_true", help="keep the work directory (child logs)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the children are killed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--reads" in argv:
        import multihost_reads

        return multihost_reads.main([a for a in argv if a != "--reads"])
    if "--collectives" in argv:
        import multihost_collectives

        return multihost_collectives.main([a for a in argv if a != "--collectives"])
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="multihost-", dir=args.dir)
    began = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "keepax multi-process",
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                             else sys.executable, os.path.relpath(os.path.abspath(__file__), REPO),
                             *sys.argv[1:]]),
        "machine": bench_core.machine_info(args.dir),
        "processes": NPROC,
        "devices_per_process": DEVICES_PER_PROCESS,
        "notes": [],
    }
    ok = False
    try:
        procs = run_children(args, work)
        children = [p.result for p in procs]
        result["exit_status"] = [p.returncode for p in procs]
        if not all(p.ok for p in procs):
            result["notes"].append("a child failed: " + "; ".join(
                f"process {p.index} exit {p.returncode}{' (timed out)' if p.timed_out else ''}: "
                + p.output[-800:].replace("\n", " | ") for p in procs if not p.ok))
        if all(c and c.get("repeats") for c in children):
            c0 = children[0]
            result["state"] = {k: c0[k] for k in ("arrays", "unique_bytes", "local_unique_bytes",
                                                   "needed_bytes", "mesh", "specs")}
            result["state"]["per_process"] = [{k: c[k] for k in ("index", "devices", "local_unique_bytes",
                                                                 "needed_bytes", "build_seconds")}
                                              for c in children]
            result["cold_reads"] = c0["cold"]
            if not c0["cold"]:
                result["notes"].append("/proc/sys/vm/drop_caches not writable: cold reads not measured")
            if c0.get("orbax_note"):
                result["notes"].append(c0["orbax_note"])
            for c in children:
                for e in c["orbax_errors"]:
                    result["notes"].append(f"Orbax failed on process {c['index']} (repeat {e['repeat'] + 1}): "
                                           f"{e['error']}")
            result["children"] = children
            result["analysis"] = analyse(children)
            result["targets"] = targets(result["analysis"])
            ok = all(p.ok for p in procs)
        else:
            result["notes"].append("no repeat completed on every process")
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["total_seconds"] = time.perf_counter() - began
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["notes"].append(f"work directory (child logs) kept: {work}")
    bench_core.write_report(result, args.dir, "multihost", markdown(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
