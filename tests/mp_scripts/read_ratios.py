"""Saves a state of a few larger matrices and 200 small arrays, then restores it onto the saved
mesh and onto two other layouts, reporting what each process read against what it needed.

Usage: read_ratios.py PATH. Reports ``{"index", "ratios": {layout: {"bytes_read", "needed",
"table_bytes"}}}``; every restored shard is checked element for element.
"""

from __future__ import annotations

import mp_prelude  # noqa: I001 - first: sets XLA_FLAGS before jax is imported

index, count = mp_prelude.init()

import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import keepax  # noqa: E402
from keepax._src.format import boxes  # noqa: E402

SMALL_SPECS = [P("data"), P("data", "model"), P(None, "model"), P()]
SHAPES = {"big": (96, 8192), "tall": (4096, 96)} | {f"s{i:03d}": (24, 16) for i in range(200)}
SPECS = {"big": P("data", "model"), "tall": P("data")} | {
    f"s{i:03d}": SMALL_SPECS[i % 4] for i in range(200)}


def values(name: str, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """A function of the global index and the leaf's name only."""
    seed = sum(map(ord, name))
    grids = np.meshgrid(*[np.arange(a, b, dtype=np.int64) for a, b in box], indexing="ij")
    flat = np.int64(seed)
    for g in grids:
        flat = flat * 7919 + g
    return (flat % 65521).astype(np.float32)


def box_of(idx: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(idx, shape))


def restore(path: str, shardings: dict[str, NamedSharding]) -> dict[str, int]:
    like = {k: jax.ShapeDtypeStruct(SHAPES[k], np.float32, sharding=shardings[k]) for k in SHAPES}
    stats = keepax.RestoreStats()
    out = keepax.restore(path, like, stats=stats)
    needed = 0
    for k, x in out.items():
        for shard in x.addressable_shards:
            want = values(k, box_of(shard.index, SHAPES[k]))
            assert np.array_equal(np.asarray(shard.data), want), (k, shard.index)
        needed += sum(int(np.prod(b[1])) * 4 for b in boxes.target_boxes(shardings[k], SHAPES[k]))
    return {"bytes_read": stats.bytes_read, "needed": needed,
            "table_bytes": stats.table_bytes_read}


path = sys.argv[1]
mesh = mp_prelude.global_mesh((count, 2), ("data", "model"))
saved = {k: NamedSharding(mesh, SPECS[k]) for k in SHAPES}
keepax.save(path, {k: jax.make_array_from_callback(
    SHAPES[k], saved[k], lambda i, k=k: values(k, box_of(i, SHAPES[k]))) for k in SHAPES})
transposed = jax.sharding.Mesh(mesh.devices.T, ("data", "model"))
ratios = {
    "saved mesh": restore(path, saved),
    # Process 0 now holds column halves of what it saved, and every row.
    "transposed mesh": restore(path, {k: NamedSharding(transposed, SPECS[k]) for k in SHAPES}),
    # Rows in 4 blocks interleaved over the processes: cuts every saved cell in two.
    "interleaved rows": restore(path, {k: NamedSharding(mesh, P(("model", "data")))
                                       for k in SHAPES}),
}
mp_prelude.report({"index": index, "ratios": ratios})
