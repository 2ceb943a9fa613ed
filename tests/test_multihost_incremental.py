"""Multi-process incremental saves: two real ``jax.distributed`` processes share one chunk
store (``tests/mp_scripts/incremental_run.py``); each writes only its own new chunks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multiproc import SCRIPTS_DIR, run_processes, start_processes

import keepax

SCRIPT = SCRIPTS_DIR / "incremental_run.py"
STORE = Path(".keepax-store") / "data"


def _values(step: int) -> dict[str, np.ndarray]:
    base = (256, 512)
    adapter = (16, 512)
    return {
        "base": np.arange(np.prod(base), dtype=np.float32).reshape(base) / 7,
        "adapter": np.full(adapter, step, np.float32) + np.arange(adapter[1], dtype=np.float32),
        "mu": np.arange(adapter[0] * 64, dtype=np.float32).reshape(adapter[0], 64) * step,
        "count": np.array([step], np.int32),
    }


def _referenced(directory: Path, steps: list[int]) -> set[str]:
    """The store files the chunk tables of these steps name."""
    names = set()
    for step in steps:
        manifest = json.loads((directory / f"{step:08d}" / "manifest.json").read_text())
        assert manifest["files"] == [] and manifest["version"] == "1.2"
        for table in manifest["tables"]:
            doc = json.loads((directory / f"{step:08d}" / table["name"]).read_text())
            for f in doc["files"]:
                assert f["name"].startswith("../.keepax-store/data/"), f
                base = f["name"].rsplit("/", 1)[1]
                # A process lists only files it wrote itself.
                assert f"-p{doc['process']:05d}-" in base, (base, doc["process"])
                names.add(base)
    return names


def _stored(directory: Path) -> set[str]:
    return {p.name for p in (directory / STORE).iterdir()}


def _check(directory: Path, step: int) -> None:
    path = str(directory / f"{step:08d}")
    for restored in (keepax.restore(path), keepax.open(path).restore()):
        for key, want in _values(step).items():
            assert np.array_equal(restored[key].view(np.uint8), want.view(np.uint8)), (key, step)
    assert keepax.verify(path) == []


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("incremental")
    directory = tmp / "run"
    results = run_processes(SCRIPT, 2, tmp_path=tmp, args=["run", str(directory)], timeout=120)
    return directory, results[0].result


def test_each_process_writes_only_what_changed(run) -> None:
    directory, report = run
    assert report["steps"] == [4, 5, 6]
    first, *later = report["added"]
    assert first > 512 * 1024  # the base, once
    for added in later:  # the adapter and its moments; the base is never written again
        assert report["changed"] <= added <= 1.05 * report["changed"] + 4096, report


def test_kept_steps_restore_from_one_process_and_verify(run) -> None:
    directory, report = run
    for step in report["steps"]:
        _check(directory, step)
    out = subprocess.run([sys.executable, "-m", "keepax", "verify", str(directory / f"{6:08d}")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_copy_of_a_step_is_self_contained(run, tmp_path: Path) -> None:
    directory, _ = run
    copy = tmp_path / "copy"
    out = subprocess.run([sys.executable, "-m", "keepax", "cp", str(directory / f"{6:08d}"),
                          str(copy)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ".." not in (copy / "manifest.json").read_text()
    restored = keepax.restore(str(copy))
    for key, want in _values(6).items():
        assert np.array_equal(restored[key].view(np.uint8), want.view(np.uint8)), key
    assert keepax.verify(str(copy)) == []


def test_retention_and_gc_leave_only_what_kept_steps_refer_to(run) -> None:
    directory, report = run
    referenced = _referenced(directory, report["steps"])
    assert referenced <= _stored(directory)
    # Both processes' files are referred to (process 1's too, never collected).
    assert {n.split("-")[1] for n in referenced} == {"p00000", "p00001"}
    out = subprocess.run([sys.executable, "-m", "keepax", "gc", str(directory), "--apply",
                          "--grace", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _stored(directory) == referenced
    _check(directory, 6)


def test_a_killed_process_leaves_no_dangling_reference_and_the_restart_reclaims(
    run, tmp_path: Path
) -> None:
    directory, report = run
    before = _stored(directory)
    with start_processes(SCRIPT, 2, tmp_path=tmp_path, env={"KEEPAX_MP_HEARTBEAT": "4"},
                         args=["stall", str(directory)]) as group:
        group.wait_for_output(1, "STALLED", timeout=90)
        group.kill(1)
        results = group.wait(60, failure_grace=None)
    assert all("SAVED 7" not in r.output for r in results)
    steps = keepax.CheckpointManager(str(directory), read_only=True).all_steps()
    assert steps == report["steps"]
    left = _stored(directory) - before
    assert any("-p00001-" in n for n in left)  # process 1's new chunks, referred to by nothing
    for step in steps:
        _check(directory, step)
    results = run_processes(SCRIPT, 2, tmp_path=tmp_path, args=["recover", str(directory)],
                            timeout=120)
    for r in results:
        assert r.result["steps"] == report["steps"] and r.result["after"] == [5, 6, 7]
    assert not set(results[0].result["files_at_start"]) & left  # reclaimed at the start
    # Retention dropped step 4; its dead files wait for the next save's announcement, and
    # a grace-0 gc removes them: then the store holds exactly what steps 5-7 refer to.
    subprocess.run([sys.executable, "-m", "keepax", "gc", str(directory), "--apply",
                    "--grace", "0"], check=True, capture_output=True, timeout=120)
    assert _stored(directory) == _referenced(directory, [5, 6, 7])
    _check(directory, 7)
