"""Per-process chunk tables (``keepax._src.format.tables``, ``docs/FORMAT.md`` §14).

Three parts: the pure planning functions (grids, cells, who writes what); a round trip built by
hand with the module's own functions, without processes; and hostile tables and manifests,
made by damaging a checkpoint that two real ``jax.distributed`` processes wrote, which must
always end in a :class:`CorruptCheckpointError` (never another exception, never a large
allocation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multihost_state import global_state
from multiproc import SCRIPTS_DIR, run_processes

import keepax
from keepax._src.format import datafiles as fmt
from keepax._src.format import reading, tables
from keepax._src.format.manifest import (
    ArrayLeaf,
    CellRef,
    Chunk,
    CommitMarker,
    DataFile,
    Layout,
    Manifest,
    TableRef,
    ValueLeaf,
)
from keepax._src.format.tables import (
    Assigner,
    cell_box,
    cells_of,
    grid_of,
    grid_shape,
    linear,
    writer_of,
)
from keepax._src.io import memory
from keepax._src.io.memory import MemoryStorage
from keepax.errors import CorruptCheckpointError, FormatVersionError, KeepaxError

# ---------------------------------------------------------------------------------------------
# Planning (pure).


def _grid_boxes(shape: tuple[int, ...], block: tuple[int, ...]) -> list[Any]:
    grid = grid_shape(shape, block)
    return [cell_box(shape, block, c) for c in itertools.product(*(range(g) for g in grid))]


def test_grid_of_regular_grids() -> None:
    assert grid_of((8, 6), _grid_boxes((8, 6), (2, 3))) == (2, 3)
    assert grid_of((8, 6), [((0, 0), (8, 6))]) == (8, 6)  # one cell: fully replicated
    assert grid_of((8,), [((0,), (4,)), ((4,), (4,))]) == (4,)
    # The same boxes listed several times (replicas) change nothing.
    assert grid_of((8,), [((4,), (4,)), ((0,), (4,)), ((4,), (4,))]) == (4,)


def test_grid_of_uneven_edges_and_empty_boxes() -> None:
    # JAX splits 10 over 3 devices as 4, 4, 2; and 5 over 4 as 2, 2, 1 plus an empty box.
    assert grid_of((10,), [((0,), (4,)), ((4,), (4,)), ((8,), (2,))]) == (4,)
    assert grid_of((5,), [((0,), (2,)), ((2,), (2,)), ((4,), (1,)), ((5,), (0,))]) == (2,)
    assert grid_of((5, 3), [((0, 0), (3, 3)), ((3, 0), (2, 3)), ((5, 0), (0, 3))]) == (3, 3)


@pytest.mark.parametrize("boxes", [
    [((0,), (3,)), ((3,), (5,))],                  # unequal blocks
    [((0,), (4,))],                                # a cell missing
    [((0,), (4,)), ((4,), (2,)), ((6,), (2,))],    # last blocks split again
    [((0,), (4,)), ((2,), (4,)), ((4,), (4,))],    # overlapping
    [((1,), (4,)), ((5,), (3,))],                  # not starting at 0
])
def test_grid_of_irregular_boxes_is_none(boxes: list[Any]) -> None:
    assert grid_of((8,), boxes) is None


def test_grid_of_irregular_2d_is_none() -> None:
    # Rows split differently in each column: not a grid.
    boxes = [((0, 0), (4, 2)), ((4, 0), (4, 2)), ((0, 2), (2, 2)), ((2, 2), (6, 2))]
    assert grid_of((8, 4), boxes) is None
    assert Assigner(0, 2).leaf((8, 4), 4, {b: [0] for b in boxes}) is None


def test_zero_size_and_rank_0() -> None:
    assert grid_of((0, 3), [((0, 0), (0, 3))]) == (1, 1)
    assert grid_of((0,), []) == (1,)
    assert list(cells_of((0, 3), (1, 1), ((0, 0), (0, 3)))) == []
    assert grid_of((), [((), ())]) == ()
    assert grid_shape((), ()) == ()
    assert list(cells_of((), (), ((), ()))) == [()]
    assert linear((), ()) == 0
    assert cell_box((), (), ()) == ((), ())
    a = Assigner(1, 2).leaf((), 8, {((), ()): [0, 1]})
    assert a is not None and a.ref.block == ()
    # A zero-size array: nothing to write, no cell needed by a reader.
    z = Assigner(0, 2).leaf((0, 3), 4, {((0, 0), (0, 3)): [0, 1]})
    assert z is not None and z.mine == ()


@st.composite
def _shape_block(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=rank, max_size=rank)))
    block = tuple(draw(st.integers(1, n + 2)) for n in shape)
    return shape, block


@settings(max_examples=60, deadline=None)
@given(_shape_block(), st.booleans())
def test_grid_of_recovers_the_block(sb: Any, with_empty: bool) -> None:
    shape, block = sb
    boxes = _grid_boxes(shape, block)
    # Every element in exactly one cell.
    assert sum(math.prod(b[1]) for b in boxes) == math.prod(shape)
    if with_empty:
        boxes.append((tuple(shape), (0,) * len(shape)))
    assert grid_of(shape, boxes) == tuple(min(b, n) for b, n in zip(block, shape))


@settings(max_examples=60, deadline=None)
@given(_shape_block(), st.data())
def test_cells_of_cell_box_and_linear_round_trip(sb: Any, data: Any) -> None:
    shape, block = sb
    grid = grid_shape(shape, block)
    cells = list(itertools.product(*(range(g) for g in grid)))
    assert [linear(c, grid) for c in cells] == list(range(math.prod(grid)))
    for c in cells:
        assert tables._unravel(linear(c, grid), grid) == c
        assert list(cells_of(shape, block, cell_box(shape, block, c))) == [c]
    # An arbitrary non-empty box: the cells it overlaps are exactly those whose boxes meet it.
    start = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    size = tuple(data.draw(st.integers(1, n - s)) for s, n in zip(start, shape))
    got = set(cells_of(shape, block, (start, size)))

    def meets(c: tuple[int, ...]) -> bool:
        cs, cn = cell_box(shape, block, c)
        return all(max(a, b) < min(a + n, b + m) for a, n, b, m in zip(cs, cn, start, size))

    assert got == {c for c in cells if meets(c)}


def _mixed_holders() -> list[tuple[tuple[int, ...], int, dict[Any, Any]]]:
    """Arrays over 3 processes: private, partly and fully replicated, uneven."""
    return [
        ((8, 4), 4, {b: [min(i, 2)] for i, b in enumerate(_grid_boxes((8, 4), (4, 2)))}),
        ((9,), 2, {b: [k, (k + 1) % 3] for k, b in enumerate(_grid_boxes((9,), (3,)))}),
        ((5, 5), 8, {((0, 0), (5, 5)): [0, 1, 2]}),
        ((10,), 1, {b: [0, 1, 2] for b in _grid_boxes((10,), (4,))}),
        ((), 4, {((), ()): [1, 2]}),
    ]


def _run(assigner: Assigner, arrays: Any) -> list[Any]:
    return [assigner.leaf(shape, itemsize, holders) for shape, itemsize, holders in arrays]


def test_assigner_is_deterministic() -> None:
    for process in range(3):
        a, b = Assigner(process, 3), Assigner(process, 3)
        assert _run(a, _mixed_holders()) == _run(b, _mixed_holders())
        assert a.layouts == b.layouts
    # Every process decides the same refs and layouts (only ``mine`` differs).
    runs = [Assigner(p, 3) for p in range(3)]
    refs = [[x.ref for x in _run(a, _mixed_holders())] for a in runs]
    assert refs[0] == refs[1] == refs[2]
    assert runs[0].layouts == runs[1].layouts == runs[2].layouts


def test_each_cell_has_exactly_one_writer_among_its_holders() -> None:
    runs = [Assigner(p, 3) for p in range(3)]
    results = [_run(a, _mixed_holders()) for a in runs]
    for i, (_, _, holders) in enumerate(_mixed_holders()):
        written: dict[Any, int] = {}
        for p in range(3):
            for box in results[p][i].mine:
                assert box not in written, (i, box)
                written[box] = p
        # Exactly the non-empty cells, each by one of its holders, as writer_of says.
        assert set(written) == {b for b in holders if math.prod(b[1])}
        ref = results[0][i].ref
        layout = runs[0].layouts[ref.layout]
        for box, p in written.items():
            assert p in holders[box]
            cell = tuple(s // b for s, b in zip(box[0], ref.block))
            assert writer_of(layout, ref.rotation, linear(cell, layout.grid)) == p


@pytest.mark.parametrize(("n", "p"), [(12, 4), (10, 4), (6, 3), (7, 2)])
def test_replicated_arrays_are_spread_over_processes(n: int, p: int) -> None:
    counts = [0] * p
    for process in range(p):
        assigner = Assigner(process, p)
        for _ in range(n):
            a = assigner.leaf((16,), 4, {((0,), (16,)): range(p)})
            counts[process] += len(a.mine)
    assert sum(counts) == n
    assert max(counts) - min(counts) <= (0 if n % p == 0 else 1), counts


def test_layouts_are_shared_by_arrays_with_the_same_grid_and_holders() -> None:
    a = Assigner(0, 2)
    x = a.leaf((8,), 4, {((0,), (4,)): [0], ((4,), (4,)): [1]})
    y = a.leaf((6,), 2, {((0,), (3,)): [0], ((3,), (3,)): [1]})  # other shape, same layout
    z = a.leaf((8,), 4, {((0,), (4,)): [1], ((4,), (4,)): [0]})  # other holders
    w = a.leaf((8,), 4, {((0,), (8,)): [0, 1]})  # other grid
    assert x.ref.layout == y.ref.layout == 0 and z.ref.layout == 1 and w.ref.layout == 2
    assert a.layouts == [Layout((2,), ((0,), (1,))), Layout((2,), ((1,), (0,))),
                         Layout((1,), ((0, 1),))]


def test_host_local_layouts_name_only_this_process() -> None:
    for process in range(3):
        a = Assigner(process, 3, host_local=True)
        results = _run(a, _mixed_holders())
        for layout in a.layouts:
            assert all(w in ((), (process,)) for w in layout.writers)
        for (_, _, holders), result in zip(_mixed_holders(), results):
            held = {b for b, procs in holders.items() if process in procs and math.prod(b[1])}
            assert set(result.mine) == held


# ---------------------------------------------------------------------------------------------
# A round trip built by hand, without processes.

_VALUES = {
    "a": np.arange(8 * 6, dtype=np.float32).reshape(8, 6),  # rows split over 2 processes
    "b": np.arange(5, dtype=np.int16),  # replicated
    "c": np.arange(16, dtype=np.uint8).reshape(4, 4),  # 2 x 2 cells, all replicated
}


def _holders_of(key: str) -> dict[Any, Any]:
    if key == "a":
        return {((0, 0), (4, 6)): [0], ((4, 0), (4, 6)): [1]}
    if key == "b":
        return {((0,), (5,)): [0, 1]}
    return {b: [0, 1] for b in _grid_boxes((4, 4), (2, 2))}


def _build(storage: MemoryStorage, directory: str, *, host_local: bool = False,
           processes: tuple[int, ...] = (0, 1)) -> Manifest:
    """Writes what each process of a save would write; returns the manifest process 0 writes
    (or, host-local, process ``processes[0]``'s own)."""
    keys = sorted(_VALUES)
    refs: list[TableRef] = []
    layouts: list[Layout] = []
    cells: dict[int, CellRef] = {}
    for process in processes:
        assigner = Assigner(process, 2, host_local=host_local)
        sources = []
        for leaf, key in enumerate(keys):
            value = _VALUES[key]
            a = assigner.leaf(value.shape, value.itemsize, _holders_of(key))
            assert a is not None
            cells[leaf] = a.ref
            for start, size in a.mine:
                sl = tuple(slice(s, s + n) for s, n in zip(start, size))
                tensor = fmt.tensor_name(f"['{key}']", start, size, value.shape)
                sources.append(fmt.ChunkSource(leaf, tensor, start, size,
                                               value.dtype, lambda v=value, sl=sl: v[sl]))
        layouts = assigner.layouts
        files, chunks = fmt.write_data_files(storage, directory, sources,
                                             prefix=f"p{process:05d}")
        pairs = [(leaf, c) for leaf, cs in sorted(chunks.items()) for _, c in cs]
        private, shared = tables.split_shared(cells, layouts, pairs)
        for is_shared, group in ((False, private), (True, shared)):
            if not group and is_shared:
                continue
            data = tables.encode_table(process, files, group)
            name = tables.table_name(process, is_shared)
            storage.write_bytes(f"{directory}/{name}", data)
            refs.append(TableRef(process, name, len(data), fmt.checksum(data), is_shared))
    leaves = tuple(
        ArrayLeaf(f"['{key}']", "numpy", _VALUES[key].shape, _VALUES[key].dtype.name, (),
                  cells=cells[i])
        for i, key in enumerate(keys)
    ) + (ValueLeaf("['step']", "int", 3),)
    tree = {"k": "dict", "keys": [*keys, "step"],
            "c": [{"k": "leaf", "i": i} for i in range(len(keys) + 1)]}
    manifest = Manifest((1, 1), tree, leaves, (), {}, 0.0, {"process_count": 2},
                        tables=tuple(refs), layouts=tuple(layouts))
    data = manifest.to_json()
    storage.write_bytes(f"{directory}/manifest.json", data)
    marker = CommitMarker((1, 1), len(data), fmt.checksum(data), 0.0)
    storage.write_bytes(f"{directory}/keepax.commit", marker.to_json())
    parsed = Manifest.from_json(data, where=directory)
    assert parsed == manifest
    return parsed


@pytest.fixture
def store() -> Iterator[tuple[MemoryStorage, str]]:
    name = f"tables-{os.getpid()}-{time.monotonic_ns()}"
    yield MemoryStorage(f"memory://{name}"), name
    memory.clear(name)


def _table_sizes(manifest: Manifest) -> dict[tuple[int, bool], int]:
    return {(t.process, t.shared): t.nbytes for t in manifest.tables}


def test_hand_built_checkpoint_restores_and_verifies(store: Any) -> None:
    storage, name = store
    manifest = _build(storage, "ckpt")
    assert len(manifest.tables) == 4 and manifest.files == ()
    restored = keepax.restore(f"memory://{name}/ckpt")
    assert restored["step"] == 3
    for key, want in _VALUES.items():
        assert restored[key].dtype == want.dtype and np.array_equal(restored[key], want), key
    assert keepax.verify(f"memory://{name}/ckpt") == []


def test_resolve_reads_only_the_tables_needed(store: Any) -> None:
    storage, _ = store
    manifest = _build(storage, "ckpt")
    sizes = _table_sizes(manifest)
    a, b, c = 0, 1, 2  # leaf indices (sorted keys)
    # The rows of 'a' process 1 wrote: its private table only.
    out, nbytes = tables.resolve(storage, "ckpt", "ckpt", manifest, {a: [((5, 1), (2, 3))]})
    assert nbytes == sizes[(1, False)]
    assert [ch.start for ch in out.leaves[a].chunks] == [(4, 0)]
    assert out.leaves[b].chunks == () and out.leaves[c].chunks == ()
    assert [f.name for f in out.files] == ["data/p00001-000.safetensors"]
    # Replicated 'b': the shared table of whichever process wrote it.
    writer = writer_of(manifest.layouts[manifest.leaves[b].cells.layout],
                       manifest.leaves[b].cells.rotation, 0)
    out, nbytes = tables.resolve(storage, "ckpt", "ckpt", manifest, {b: [((0,), (5,))]})
    assert nbytes == sizes[(writer, True)]
    assert len(out.leaves[b].chunks) == 1 and out.leaves[a].chunks == ()
    # Nothing needed: nothing read; no tables: the manifest unchanged.
    assert tables.resolve(storage, "ckpt", "ckpt", manifest, {})[1] == 0
    assert tables.resolve(storage, "ckpt", "ckpt", manifest, {a: []})[1] == 0
    # Everything: every table, every chunk.
    whole = {i: [((0,) * len(leaf.shape), leaf.shape)] for i, leaf in enumerate(manifest.leaves)
             if isinstance(leaf, ArrayLeaf)}
    out, nbytes = tables.resolve(storage, "ckpt", "ckpt", manifest, whole)
    assert nbytes == sum(sizes.values())
    assert [len(out.leaves[i].chunks) for i in (a, b, c)] == [2, 1, 4]
    # The replicated cells of 'c' are spread over both processes.
    assert {out.files[ch.file].name for ch in out.leaves[c].chunks} == {
        "data/p00000-000.safetensors", "data/p00001-000.safetensors"}


def test_host_local_cell_without_writer_raises(store: Any) -> None:
    storage, name = store
    manifest = _build(storage, "ckpt", host_local=True, processes=(0,))
    assert {t.process for t in manifest.tables} == {0}
    a = 0
    out, _ = tables.resolve(storage, "ckpt", "ckpt", manifest, {a: [((0, 0), (4, 6))]})
    assert len(out.leaves[a].chunks) == 1
    with pytest.raises(KeepaxError, match="not stored in this directory") as info:
        tables.resolve(storage, "ckpt", "ckpt", manifest, {a: [((4, 0), (1, 1))]})
    assert not isinstance(info.value, CorruptCheckpointError)
    with pytest.raises(KeepaxError, match="not stored in this directory"):
        keepax.restore(f"memory://{name}/ckpt")
    restored = keepax.restore(f"memory://{name}/ckpt", select=["b", "c"])
    assert np.array_equal(restored["c"], _VALUES["c"])


# ---------------------------------------------------------------------------------------------
# Hostile tables and manifests (a checkpoint written by 2 real processes, then damaged).

P0, P0_SHARED, P1 = "data/p00000-chunks.json", "data/p00000-shared.json", "data/p00001-chunks.json"
P1_SHARED = "data/p00001-shared.json"


@pytest.fixture(scope="module")
def saved2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by 2 real processes (the one multi-process run of this file)."""
    tmp = tmp_path_factory.mktemp("saved2")
    run_processes(SCRIPTS_DIR / "checkpoint_roundtrip.py", 2, tmp_path=tmp,
                  args=["save-only", str(tmp / "ckpt")], timeout=120)
    return tmp / "ckpt"


@pytest.fixture
def ckpt(saved2: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(saved2, path)
    return path


def _doc(path: Path, name: str = "manifest.json") -> Any:
    return json.loads((path / name).read_bytes())


def _write_manifest(path: Path, doc: Any) -> None:
    """Writes a manifest and a commit marker matching it (size and CRC-32C)."""
    data = json.dumps(doc).encode()
    (path / "manifest.json").write_bytes(data)
    marker = {"format": "keepax", "version": doc.get("version", "1.1"),
              "manifest_nbytes": len(data), "manifest_crc32c": crc32c.crc32c(data),
              "committed": 1.0}
    (path / "keepax.commit").write_bytes(json.dumps(marker).encode())


def _write_table(path: Path, name: str, table: Any) -> None:
    """Writes a table and records its true size and CRC-32C in the manifest (and marker), so
    that the damage reaches the table's own checks."""
    data = table if isinstance(table, bytes) else json.dumps(table).encode()
    (path / name).write_bytes(data)
    doc = _doc(path)
    for t in doc["tables"]:
        if t["name"] == name:
            t["nbytes"], t["crc32c"] = len(data), crc32c.crc32c(data)
    _write_manifest(path, doc)


def _leaf_index(path: Path, key: str) -> int:
    return [leaf["path"] for leaf in _doc(path)["leaves"]].index(f"['{key}']")


@contextlib.contextmanager
def _no_huge_allocation(limit: int = 1 << 30) -> Iterator[None]:
    """Caps the address space so that a huge allocation fails at once (MemoryError)."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    old = resource.getrlimit(resource.RLIMIT_AS)
    capped = old[1] == resource.RLIM_INFINITY or vm + limit <= old[1]
    if capped:
        resource.setrlimit(resource.RLIMIT_AS, (vm + limit, old[1]))
    try:
        yield
    finally:
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, old)


def _expect_corrupt(path: Path, match: str) -> None:
    """restore and verify both report the damage as a CorruptCheckpointError."""
    with _no_huge_allocation():
        with pytest.raises(CorruptCheckpointError, match=match):
            keepax.restore(str(path))
        try:
            problems = keepax.verify(str(path))
        except CorruptCheckpointError as e:
            assert re.search(match, str(e)), str(e)
        else:
            assert problems and any(re.search(match, p) for p in problems), problems


def test_saved_checkpoint_is_sound(ckpt: Path) -> None:
    assert keepax.verify(str(ckpt)) == []
    restored = keepax.restore(str(ckpt))
    for key in ("w", "rows", "bias", "small", "host"):
        assert np.array_equal(restored[key], global_state()[key]), key


def test_table_size_or_crc_differs_from_manifest(ckpt: Path) -> None:
    data = (ckpt / P0).read_bytes()
    (ckpt / P0).write_bytes(data + b" ")
    _expect_corrupt(ckpt, f"has {len(data) + 1} bytes, the manifest says {len(data)}")
    (ckpt / P0).write_bytes(data.replace(b'"process":0', b'"process":7'))
    _expect_corrupt(ckpt, "does not match its checksum")


def test_table_missing(ckpt: Path) -> None:
    (ckpt / P1_SHARED).unlink()
    _expect_corrupt(ckpt, "p00001-shared.json: it is missing")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[" * 100_000, b"[]", b"null",
                                 b'{"format":"keepax","kind":"manifest"}'])
def test_table_not_a_table(ckpt: Path, raw: bytes) -> None:
    _write_table(ckpt, P0, raw)
    _expect_corrupt(ckpt, "invalid chunk table data/p00000-chunks.json")


def test_table_naming_another_process(ckpt: Path) -> None:
    for name, other in [(P0, 1), (P0, "0"), (P0, None), (P1, True), (P1, 1.0)]:
        table = _doc(ckpt, name)
        table["process"] = other
        _write_table(ckpt, name, table)
        _expect_corrupt(ckpt, "written by process")


def test_writer_whose_table_is_not_listed(ckpt: Path) -> None:
    doc = _doc(ckpt)
    doc["tables"] = [t for t in doc["tables"] if t["name"] != P1_SHARED]
    _write_manifest(ckpt, doc)
    _expect_corrupt(ckpt, "no chunk table of process 1 is listed")


def test_chunk_checksum_in_a_table_is_checked(ckpt: Path) -> None:
    w = _leaf_index(ckpt, "w")
    table = _doc(ckpt, P1)
    (c,) = [c for c in table["chunks"] if c[0] == w and c[5] == [8, 4]]
    c[4] ^= 1
    _write_table(ckpt, P1, table)
    with pytest.raises(CorruptCheckpointError):
        keepax.restore(str(ckpt))
    problems = keepax.verify(str(ckpt))
    assert len(problems) == 1 and "['w']" in problems[0], problems


def _damage_chunk(ckpt: Path, name: str, index: int, change: Callable[[list], Any]) -> None:
    table = _doc(ckpt, name)
    change(table["chunks"][index])
    _write_table(ckpt, name, table)


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: c.__setitem__(0, 3), "names a leaf without cells"),  # ['lr'], a value leaf
    (lambda c: c.__setitem__(0, 99), "names leaf 99"),
    (lambda c: c.__setitem__(0, -1), "must be \\[leaf"),
    (lambda c: c.__setitem__(1, 1), "outside its data file"),
    (lambda c: c.__setitem__(2, 10**6), "outside its data file"),
    (lambda c: c.__setitem__(2, 10**30), "outside its data file"),
    (lambda c: c.__setitem__(3, 2**62), "outside its data file"),
    (lambda c: c.__setitem__(4, "1"), "must be \\[leaf"),
    (lambda c: c.__setitem__(5, [0]), "start and shape must be 2 integers"),
    (lambda c: c.__setitem__(6, [8, 4.0]), "start and shape must be 2 integers"),
    (lambda c: c.__setitem__(6, [8, 2]), "size does not match its shape"),
    (lambda c: c.__setitem__(5, [0, 2]), "outside the cell it starts in"),
    (lambda c: c.__setitem__(5, [16, 0]), "outside the cell it starts in"),  # outside the array
    (lambda c: c.__setitem__(5, [10**40, 0]), "outside the cell it starts in"),
    (lambda c: c.__setitem__(5, [8, 0]), "belongs to a cell this table does not hold"),
    (lambda c: c.append(0), "must be \\[leaf"),
])
def test_bad_chunk_entry(ckpt: Path, change: Callable[[list], Any], match: str) -> None:
    w = _leaf_index(ckpt, "w")
    table = _doc(ckpt, P0)
    (j,) = [j for j, c in enumerate(table["chunks"]) if c[0] == w and c[5] == [0, 0]]
    _damage_chunk(ckpt, P0, j, change)
    _expect_corrupt(ckpt, match)


def test_chunk_in_the_wrong_table(ckpt: Path) -> None:
    # A private cell's chunk moved into the shared table of the same process.
    rows = _leaf_index(ckpt, "rows")
    private, shared = _doc(ckpt, P0), _doc(ckpt, P0_SHARED)
    (moved,) = [c for c in private["chunks"] if c[0] == rows]
    private["chunks"].remove(moved)
    shared["chunks"].append(moved)
    _write_table(ckpt, P0, private)
    _write_table(ckpt, P0_SHARED, shared)
    _expect_corrupt(ckpt, "belongs to a cell this table does not hold")


def test_replicated_chunk_in_a_private_table(ckpt: Path) -> None:
    shared, private = _doc(ckpt, P1_SHARED), _doc(ckpt, P1)
    moved = shared["chunks"].pop()
    private["chunks"].append(moved)
    _write_table(ckpt, P1_SHARED, shared)
    _write_table(ckpt, P1, private)
    _expect_corrupt(ckpt, "belongs to a cell this table does not hold")


def test_overlapping_chunks(ckpt: Path) -> None:
    table = _doc(ckpt, P0)
    table["chunks"][1][2] = table["chunks"][2][2] - 8  # into the next chunk's bytes
    _write_table(ckpt, P0, table)
    _expect_corrupt(ckpt, "chunks overlap in data/p00000-000.safetensors")


def test_a_chunk_listed_twice(ckpt: Path) -> None:
    table = _doc(ckpt, P0)
    table["chunks"].append(table["chunks"][0])
    _write_table(ckpt, P0, table)
    _expect_corrupt(ckpt, "chunks overlap")


def test_two_processes_list_the_same_data_file(ckpt: Path) -> None:
    for name in (P1, P1_SHARED):
        table = _doc(ckpt, name)
        table["files"][0]["name"] = "data/p00000-000.safetensors"
        _write_table(ckpt, name, table)
    _expect_corrupt(ckpt, "listed by two chunk tables")


def test_a_process_lists_its_file_with_two_sizes(ckpt: Path) -> None:
    table = _doc(ckpt, P0_SHARED)
    table["files"][0]["nbytes"] += 100
    _write_table(ckpt, P0_SHARED, table)
    _expect_corrupt(ckpt, "listed by two chunk tables that disagree")


def test_bad_file_entries(ckpt: Path) -> None:
    for files, match in [
        ([{"name": "data/../x.safetensors", "nbytes": 9}], "no valid data file name"),
        ([{"name": "manifest.json", "nbytes": 9}], "no valid data file name"),
        ([{"name": "data/a.safetensors", "nbytes": -1}], "non-negative integer"),
        (["data/a.safetensors"], "no valid data file name"),
        ([{"name": "data/a.safetensors", "nbytes": 9}] * 2, "listed twice"),
    ]:
        table = _doc(ckpt, P0)
        table["files"] = files
        _write_table(ckpt, P0, table)
        _expect_corrupt(ckpt, match)


def test_cell_not_covered(ckpt: Path) -> None:
    w = _leaf_index(ckpt, "w")
    table = _doc(ckpt, P1)
    table["chunks"] = [c for c in table["chunks"] if not (c[0] == w and c[5] == [8, 4])]
    _write_table(ckpt, P1, table)
    _expect_corrupt(ckpt, "cover 0 of the 32 elements of shard \\[1, 1\\]")


def test_cell_partly_covered(ckpt: Path) -> None:
    # Half a cell (a valid chunk of its first rows, inside the file): the volume is short.
    w = _leaf_index(ckpt, "w")
    table = _doc(ckpt, P1)
    (c,) = [c for c in table["chunks"] if c[0] == w and c[5] == [8, 4]]
    c[3], c[6] = 64, [4, 4]
    _write_table(ckpt, P1, table)
    _expect_corrupt(ckpt, "cover 16 of the 32 elements")


# Manifest damage: each function changes the manifest document in place.
def _set_writers(doc: Any) -> None:
    doc["layouts"][0]["writers"] = [[0, 5]]


def _grid_mismatch(doc: Any) -> None:
    (leaf,) = [x for x in doc["leaves"] if x["path"] == "['w']"]
    leaf["cells"]["block"] = [4, 4]


def _layout_out_of_range(doc: Any) -> None:
    (leaf,) = [x for x in doc["leaves"] if x["path"] == "['w']"]
    leaf["cells"]["layout"] = len(doc["layouts"])


def _huge_grid(doc: Any) -> None:
    (leaf,) = [x for x in doc["leaves"] if x["path"] == "['w']"]
    doc["layouts"][leaf["cells"]["layout"]]["grid"] = [1 << 13, 1 << 12]  # 2**25 cells
    leaf["shape"] = [1 << 16, 1 << 14]


def _huger_grid(doc: Any) -> None:
    doc["layouts"][0]["grid"] = [1 << 48, 1 << 48, 1 << 48]


def _shared_not_bool(doc: Any) -> None:
    doc["tables"][1]["shared"] = 1


def _in_version_1_0(doc: Any) -> None:
    doc["version"] = "1.0"


def _no_tables(doc: Any) -> None:
    # Without tables, layouts may name no writer: every cell would silently read as nothing.
    doc["tables"] = []
    for layout in doc["layouts"]:
        layout["writers"] = [[] for _ in layout["writers"]]


def _inline_leaf(doc: Any, files: bool) -> None:
    # A leaf with inline chunks: resolve() replaces ``files`` by the tables' files.
    (leaf,) = [x for x in doc["leaves"] if x["path"] == "['bias']"]
    del leaf["cells"]
    leaf["chunks"] = [{"file": 0, "offset": 512, "nbytes": 10, "start": [0], "shape": [5],
                       "crc32c": 0}]
    if files:
        doc["files"] = [{"name": "data/p00000-000.safetensors", "nbytes": 974}]


def _cells_without_tables(doc: Any) -> None:
    doc.pop("tables")


@pytest.mark.parametrize(("damage", "match"), [
    (_no_tables, "lists at least one table and no files"),
    (lambda d: _inline_leaf(d, True), "lists at least one table and no files"),
    (lambda d: _inline_leaf(d, False), "has cells if and only if"),
    (_cells_without_tables, "has cells if and only if"),
    (_set_writers, "names a process without a table"),
    (lambda d: d["layouts"][0].__setitem__("writers", [[-1]]), "without a table"),
    (lambda d: d["layouts"][0].__setitem__("writers", [0]), "without a table"),
    (lambda d: d["layouts"][0].__setitem__("writers", [[0], [1]]), "one writers list per cell"),
    (_grid_mismatch, "does not cut the array into its layout's grid"),
    (_layout_out_of_range, "cells.layout 5 of 5"),
    (_huge_grid, "1 to 2\\*\\*24 cells"),
    (_huger_grid, "1 to 2\\*\\*24 cells"),
    (lambda d: d["layouts"][0].__setitem__("grid", [0]), "1 to 2\\*\\*24 cells"),
    (lambda d: d["layouts"][0].__setitem__("grid", "1"), "grid must be a list"),
    (_shared_not_bool, "shared must be true or false"),
    (lambda d: d["tables"][1].__setitem__("shared", "yes"), "shared must be true or false"),
    (_in_version_1_0, "tables need format 1.1"),
    (lambda d: d["tables"].append(dict(d["tables"][0])), "listed twice"),
    (lambda d: d["tables"][0].__setitem__("name", "data/../x.json"), "not a chunk table name"),
    (lambda d: d["tables"][0].__setitem__("name", "manifest.json"), "not a chunk table name"),
    (lambda d: d["tables"][0].__setitem__("nbytes", -1), "non-negative integer"),
    (lambda d: d["tables"][0].__setitem__("process", "0"), "non-negative integer"),
    (lambda d: d.__setitem__("tables", {}), "tables must be a list"),
    (lambda d: d.pop("layouts"), "layouts must be a list"),
    (lambda d: d["leaves"][0]["cells"].__setitem__("rotation", -1), "non-negative integer"),
    (lambda d: d["leaves"][0].__setitem__("cells", [5]), "cells must be an object"),
    (lambda d: d["leaves"][0]["cells"].__setitem__("block", [0]), "does not cut the array"),
    (lambda d: d["leaves"][0]["cells"].__setitem__("block", [5, 1]), "does not cut the array"),
])
def test_malformed_manifest_tables_layouts_cells(
    ckpt: Path, damage: Callable[[Any], Any], match: str
) -> None:
    doc = _doc(ckpt)
    damage(doc)
    _write_manifest(ckpt, doc)
    _expect_corrupt(ckpt, match)
    with pytest.raises(CorruptCheckpointError, match=match):
        keepax.inspect(str(ckpt))


# ---------------------------------------------------------------------------------------------
# Format 1.2 rows: an eighth element with the chunk's codec, stored size and digest.

DIGEST = "xxh3-128:" + "0123456789abcdef" * 2


def _rewrite_tables(storage: MemoryStorage, directory: str, manifest: Manifest,
                    edit: Callable[[dict[str, Any]], None]) -> None:
    """Edits every table, then records the tables' new sizes and CRCs in the manifest."""
    refs = []
    for ref in manifest.tables:
        path = f"{directory}/{ref.name}"
        reader = storage.open(path)
        raw = bytearray(reader.size())
        reader.read_into(0, memoryview(raw))
        reader.close()
        doc = json.loads(raw)
        edit(doc)
        data = json.dumps(doc).encode()
        storage.write_bytes(path, data)
        refs.append(dataclasses.replace(ref, nbytes=len(data), crc32c=fmt.checksum(data)))
    data = dataclasses.replace(manifest, tables=tuple(refs)).to_json()
    storage.write_bytes(f"{directory}/manifest.json", data)
    marker = CommitMarker(manifest.version, len(data), fmt.checksum(data), 0.0)
    storage.write_bytes(f"{directory}/keepax.commit", marker.to_json())


def _with_extras(extras: dict[str, Any], version: str = "1.2") -> Callable[[Any], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["version"] = version
        for row in doc["chunks"]:
            row.append(dict(extras, stored_nbytes=row[3]) if "stored" in extras else extras)
    return edit


def test_v12_rows_with_raw_codec_and_digest_read(store: Any) -> None:
    storage, name = store
    manifest = _build(storage, "ckpt")
    _rewrite_tables(storage, "ckpt", manifest,
                    _with_extras({"codec": "raw", "digest": DIGEST, "stored": True}))
    restored = keepax.restore(f"memory://{name}/ckpt")
    for key, want in _VALUES.items():
        assert np.array_equal(restored[key], want), key
    assert keepax.verify(f"memory://{name}/ckpt") == []


def test_encode_table_writes_1_2_only_with_extras() -> None:
    files = [DataFile("data/p00000-000.safetensors", 100)]
    plain = json.loads(tables.encode_table(0, files, [(0, Chunk(0, 64, 4, (0,), (4,), 1))]))
    assert plain["version"] == "1.1" and len(plain["chunks"][0]) == 7
    chunk = Chunk(0, 64, 4, (0,), (4,), 1, digest=DIGEST)
    newer = json.loads(tables.encode_table(0, files, [(0, chunk)]))
    assert newer["version"] == "1.2" and newer["chunks"][0][7] == {"digest": DIGEST}


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (_with_extras({"codec": "lz4"}), CorruptCheckpointError, "unknown codec 'lz4'"),
        (_with_extras({"codec": "lz4"}, "1.9"), FormatVersionError, "upgrade keepax"),
        (_with_extras({"codec": "zstd"}), CorruptCheckpointError, "stored_nbytes >= 1"),
        (_with_extras({"digest": "md5"}), CorruptCheckpointError, "digest"),
        (_with_extras({"stored_nbytes": 0}), CorruptCheckpointError, "stored_nbytes"),
        (lambda doc: doc["chunks"][0].append([1]), CorruptCheckpointError, "must be"),
        (lambda doc: doc.__setitem__("version", "2.0"), CorruptCheckpointError, "version"),
        (lambda doc: doc.pop("version"), CorruptCheckpointError, "version"),
    ],
)
def test_v12_bad_rows_rejected(store: Any, edit: Any, error: Any, match: str) -> None:
    storage, name = store
    manifest = _build(storage, "ckpt")
    _rewrite_tables(storage, "ckpt", manifest, edit)
    with pytest.raises(error, match=match):
        keepax.restore(f"memory://{name}/ckpt")


def test_hand_built_data_file_headers_match(store: Any) -> None:
    storage, name = store
    _build(storage, "ckpt")
    from keepax._src.checkpoint import inspection, opening  # noqa: PLC0415

    opened = opening.open_path(f"memory://{name}/ckpt")
    resolved = inspection.resolved_manifest(opened)
    assert len(resolved.files) == 2
    assert fmt.check_headers(storage, "ckpt", resolved, where="ckpt") == []


def test_tables_written_by_different_saves_are_a_corrupt_checkpoint(ckpt: Path) -> None:
    names = [t["name"] for t in _doc(ckpt)["tables"]]
    assert len(names) >= 2
    ids = {_doc(ckpt, n).get("save_id") for n in names}
    assert len(ids) == 1 and None not in ids  # one save wrote them all
    # Another save's table in place of one process's (the manifest made to match it).
    _write_table(ckpt, names[1], {**_doc(ckpt, names[1]), "save_id": "0" * 32})
    _expect_corrupt(ckpt, "written by different saves")


# ---------------------------------------------------------------------------------------------
# Reading only what a box needs (issue 11 point 7): block checksums and capped gap merging.


def _written(storage: MemoryStorage, arrays: list[np.ndarray], block_crcs: bool) -> Any:
    sources = [fmt.ChunkSource(i, f"a{i}", (0,) * a.ndim, a.shape, a.dtype, lambda a=a: a)
               for i, a in enumerate(arrays)]
    files, chunks = fmt.write_data_files(storage, "ck", sources, prefix="p0",
                                         block_crcs=block_crcs)
    return files, [chunks[i][0][1] for i in range(len(arrays))]


def _read(storage: MemoryStorage, files: Any, chunk: Any, box: Any, dtype: Any) -> Any:
    out = np.empty(box[1], dtype)
    request = reading.ReadRequest("a", [chunk], box, out)
    stats = reading.read_requests(storage, "ck", files, [request], where="ck")
    return out, stats.bytes_read


def test_a_box_cutting_a_chunk_reads_only_its_blocks(store: Any) -> None:
    storage, _ = store
    a = np.arange(512 * 2048, dtype=np.float32).reshape(512, 2048)  # 8 KiB rows
    files, (chunk,) = _written(storage, [a], block_crcs=True)
    assert chunk.crc32c_block == 4096 and len(chunk.crc32c_blocks) == a.nbytes // 4096
    assert chunk.crc32c_blocks[3] == crc32c.crc32c(a.reshape(-1).view(np.uint8)[3 * 4096:][:4096])
    for box in [((100, 0), (30, 2048)), ((0, 1024), (512, 1024)), ((7, 0), (500, 1024))]:
        out, nbytes = _read(storage, files, chunk, box, a.dtype)
        np.testing.assert_array_equal(out, a[tuple(slice(s, s + n) for s, n in zip(*box))])
        assert nbytes == out.nbytes, box
    # Damage outside the rows read goes unnoticed by this read, inside it fails it.
    path = f"ck/{files[0].name}"
    data = bytearray(storage.read_bytes(path))
    data[chunk.offset + 300 * 8192] ^= 1
    storage.write_bytes(path, bytes(data))
    _read(storage, files, chunk, ((100, 0), (30, 2048)), a.dtype)
    with pytest.raises(CorruptCheckpointError, match="block 600 of the chunk"):
        _read(storage, files, chunk, ((290, 0), (30, 2048)), a.dtype)
    # Without block checksums (single-process saves, older checkpoints): the whole chunk.
    files, (plain,) = _written(storage, [a], block_crcs=False)
    assert plain.crc32c_block == 0 and not plain.uses_codecs
    assert _read(storage, files, plain, ((100, 0), (30, 2048)), a.dtype)[1] == a.nbytes


def test_gap_merging_reads_at_most_a_sixteenth_more(store: Any) -> None:
    storage, _ = store
    arrays = [np.full((64,), i, np.float32) for i in range(400)]  # 256-byte chunks
    files, chunks = _written(storage, arrays, block_crcs=False)
    wanted = [(c, a) for i, (c, a) in enumerate(zip(chunks, arrays)) if i % 5 != 2]
    outs = [np.empty(a.shape, a.dtype) for _, a in wanted]
    requests = [reading.ReadRequest("a", [c], ((0,), a.shape), out)
                for (c, a), out in zip(wanted, outs)]
    stats = reading.read_requests(storage, "ck", files, requests, where="ck")
    for (_, a), out in zip(wanted, outs):
        np.testing.assert_array_equal(out, a)
    needed = sum(a.nbytes for _, a in wanted)
    assert needed <= stats.bytes_read <= needed * 17 / 16


@pytest.mark.parametrize("extras, match", [
    ({"crc32c_block": 3000, "crc32c_blocks": [0]}, "power of two"),
    ({"crc32c_block": 1024}, "list of 1 integers"),
    ({"crc32c_block": 1024, "crc32c_blocks": [0, 1]}, "list of 1 integers"),
    ({"crc32c_block": 1024, "crc32c_blocks": [1 << 32]}, "list of 1 integers"),
    ({"crc32c_blocks": [0]}, "power of two"),
])
def test_malformed_block_checksums_are_rejected(store: Any, extras: Any, match: str) -> None:
    storage, name = store
    manifest = _build(storage, "ckpt")
    ref = next(t for t in manifest.tables if t.process == 0 and not t.shared)
    table = json.loads(storage.read_bytes(f"ckpt/{ref.name}"))
    table["version"] = "1.2"
    table["chunks"][0].append(extras)
    data = json.dumps(table).encode()
    storage.write_bytes(f"ckpt/{ref.name}", data)
    fixed = dataclasses.replace(manifest, tables=tuple(
        dataclasses.replace(t, nbytes=len(data), crc32c=fmt.checksum(data)) if t == ref else t
        for t in manifest.tables))
    whole = {i: [((0,) * len(leaf.shape), leaf.shape)] for i, leaf in enumerate(fixed.leaves)
             if isinstance(leaf, ArrayLeaf)}
    with pytest.raises(CorruptCheckpointError, match=match):
        tables.resolve(storage, "ckpt", "ckpt", fixed, whole)
