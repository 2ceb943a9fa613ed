"""Incremental manager saves: a shared chunk store, references, reference counting, GC."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import numpy as np
import pytest

import keepax
from keepax import policies
from keepax._src.format import spec
from keepax._src.format.manifest import Manifest
from keepax._src.tools.copy import copy
from keepax.errors import CorruptCheckpointError, KeepaxWarning

BASE = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)  # 256 KiB, never changes


def _state(step: int) -> dict:
    return {"base": BASE, "adapter": np.full((64,), step, np.float32),
            "mu": np.zeros((32,), np.float32), "nu": np.zeros((32,), np.float32),
            "count": step}


def _doc(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _store_files(d: str) -> dict[str, int]:
    data = os.path.join(d, spec.STORE_DIR, "data")
    if not os.path.isdir(data):
        return {}
    return {f: os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)}


def _referenced(d: str) -> set[str]:
    out = set()
    for name in os.listdir(d):
        path = os.path.join(d, name, "manifest.json")
        if os.path.isfile(os.path.join(d, name, "keepax.commit")):
            with open(path, "rb") as f:
                m = Manifest.from_json(f.read(), where=path)
            out |= {f.name.rsplit("/", 1)[1] for f in m.files if spec.is_store_ref(f.name)}
    return out


def _check_step(d: str, step: int) -> None:
    got = keepax.restore(os.path.join(d, f"{step:08d}"))
    want = _state(step)
    for k in ("base", "adapter", "mu", "nu"):
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (step, k)
    assert got["count"] == step


def test_unchanged_chunks_are_written_once(tmp_path):
    d = str(tmp_path / "run")
    sizes = []
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        for step in range(4):
            m.save(step, _state(step))
            sizes.append(sum(_store_files(d).values()))
    assert sizes[0] >= BASE.nbytes
    for before, after in zip(sizes, sizes[1:]):
        # Only the adapter (256 bytes) and a data file header are new.
        assert 0 < after - before <= 64 * 4 + 1024
    for step in range(4):
        _check_step(d, step)
        assert keepax.verify(os.path.join(d, f"{step:08d}")) == []
    doc = _doc(os.path.join(d, "00000003", "manifest.json"))
    assert doc["version"] == "1.2"
    assert all(f["name"].startswith("../.keepax-store/data/") for f in doc["files"])


def test_full_saves_by_default(tmp_path):
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, async_save=False) as m:
        m.save(0, _state(0))
    assert not os.path.exists(os.path.join(d, spec.STORE_DIR))


def test_churn_keeps_every_kept_step_and_leaks_nothing(tmp_path):
    d = str(tmp_path / "run")
    keep = [policies.KeepLast(3), policies.KeepEvery(20)]
    with keepax.CheckpointManager(d, incremental=True, keep=keep) as m:
        for step in range(100):
            m.save(step, _state(step))
            if step % 25 == 24:
                m.wait_until_finished()
                for s in m.all_steps():
                    _check_step(d, s)
        m.wait_until_finished()
        kept = m.all_steps()
    assert kept == [0, 20, 40, 60, 80, 97, 98, 99]
    for s in kept:
        _check_step(d, s)
    assert set(_store_files(d)) == _referenced(d)  # no leak, nothing dangling
    # The base is stored once.
    assert sum(_store_files(d).values()) < 2 * BASE.nbytes


def test_deleting_a_step_keeps_data_others_refer_to(tmp_path):
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        for step in range(3):
            m.save(step, _state(step))
        m.delete(0)  # its file holds the base every other step refers to
        m.wait_until_finished()
    _check_step(d, 1)
    _check_step(d, 2)
    with keepax.CheckpointManager(d, incremental=True, async_save=False, staging_grace=0) as m:
        m.delete(1)
        m.delete(2)
        m.save(3, _state(3))  # the last step is never deleted by retention; delete is explicit
        m.wait_until_finished()
    _check_step(d, 3)
    assert set(_store_files(d)) == _referenced(d)


def test_restart_dedups_against_committed_steps_and_reclaims_leaks(tmp_path):
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(0, _state(0))
    leak = os.path.join(d, spec.STORE_DIR, "data", "deadbeef-p00000-000.safetensors")
    with open(leak, "wb") as f:
        f.write(b"x" * 100)
    before = sum(_store_files(d).values())
    with keepax.CheckpointManager(d, incremental=True, async_save=False, staging_grace=0) as m:
        m.save(1, _state(1))
    assert not os.path.exists(leak)
    assert sum(_store_files(d).values()) - (before - 100) <= 64 * 4 + 1024
    _check_step(d, 0)
    _check_step(d, 1)


def test_corrupted_shared_chunk_is_reported_for_every_step(tmp_path):
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        for step in range(3):
            m.save(step, _state(step))
    (chunk,) = [c for c in keepax.open(os.path.join(d, "00000002")).chunks()
                if c.leaf == "['base']"]
    path = os.path.join(d, "00000002", chunk.file)
    with open(path, "r+b") as f:
        f.seek(chunk.offset + 100)
        byte = f.read(1)
        f.seek(chunk.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    for step in range(3):
        problems = keepax.verify(os.path.join(d, f"{step:08d}"))
        assert any("['base']" in p and "checksum" in p for p in problems), (step, problems)
        with pytest.raises(CorruptCheckpointError):
            keepax.restore(os.path.join(d, f"{step:08d}"))


def test_two_managers_never_share_data(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
            m.save(0, _state(0))
            m.save(1, _state(1))
    for d in (a, b):
        assert _referenced(d) == set(_store_files(d))
    import shutil

    shutil.rmtree(a)
    _check_step(b, 0)
    _check_step(b, 1)


def test_copy_of_a_step_is_self_contained(tmp_path):
    d = str(tmp_path / "run")
    with keepax.CheckpointManager(d, incremental=True, async_save=False) as m:
        m.save(0, _state(0))
        m.save(1, _state(1))
    out = str(tmp_path / "copy")
    copy(os.path.join(d, "00000001"), out)
    import shutil

    shutil.rmtree(d)
    doc = _doc(os.path.join(out, "manifest.json"))
    assert all(f["name"].startswith("data/") for f in doc["files"])
    assert keepax.verify(out) == []
    got = keepax.restore(out)
    assert np.array_equal(got["base"], BASE) and got["count"] == 1


@pytest.mark.parametrize("name", [
    "../.keepax-store/data/../../etc/x.safetensors", "../../.keepax-store/data/x.safetensors",
    "../other/data/x.safetensors", "../.keepax-store/x.safetensors", "/etc/passwd",
])
def test_hostile_references_are_rejected(tmp_path, name):
    d = str(tmp_path / "ck")
    keepax.save(d, {"a": np.arange(4, dtype=np.float32)})
    doc = _doc(os.path.join(d, "manifest.json"))
    doc["version"] = "1.2"
    doc["files"][0]["name"] = name
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(json.dumps(doc).encode(), where=d)


def test_store_references_need_format_1_2(tmp_path):
    d = str(tmp_path / "ck")
    keepax.save(d, {"a": np.arange(4, dtype=np.float32)})
    doc = _doc(os.path.join(d, "manifest.json"))
    doc["files"][0]["name"] = "../.keepax-store/data/x.safetensors"
    assert doc["version"] == "1.0"
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_json(json.dumps(doc).encode(), where=d)
    doc["version"] = "1.2"
    Manifest.from_json(json.dumps(doc).encode(), where=d)


def test_incremental_on_s3(s3):
    url = f"{s3.url}/run"
    with keepax.CheckpointManager(url, incremental=True, async_save=False,
                                  keep=[policies.KeepLast(2)], storage_options=s3.options) as m:
        for step in range(4):
            m.save(step, _state(step))
        m.wait_until_finished()
    for step in (2, 3):
        got = keepax.restore(f"{url}/{step:08d}", storage_options=s3.options)
        assert np.array_equal(got["base"], BASE) and got["adapter"][0] == step
        assert keepax.verify(f"{url}/{step:08d}", storage_options=s3.options) == []
    store = [k for k in s3.keys("run/.keepax-store/data/")]
    assert 1 <= len(store) <= 3  # the base's file and the two kept adapters' at most


_WORKER = textwrap.dedent("""
    import sys, numpy as np, keepax
    from keepax import policies
    sys.path.insert(0, {tests!r})
    from test_incremental import _state
    with keepax.CheckpointManager({d!r}, incremental=True, staging_grace=0,
                                  keep=[policies.KeepLast(2), policies.KeepEvery(5)]) as m:
        start = (m.latest_step() or 0) + 1
        for step in range(start, start + 10_000):
            m.save(step, _state(step))
""")


def _committed(d: str) -> set[str]:
    """The committed steps' directory names under ``d``."""
    if not os.path.isdir(d):
        return set()
    return {n for n in os.listdir(d) if n.isdigit()
            and os.path.exists(os.path.join(d, n, "keepax.commit"))}


def _kill_trials(tmp_path, trials: int) -> None:
    d = str(tmp_path / "run")
    rng = random.Random(1234)
    seen: set[int] = set()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for _ in range(trials):
        script = _WORKER.format(d=d, tests=os.path.dirname(__file__))
        before = _committed(d)
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        # Killed at a random instant once the worker is saving (its first new step is
        # committed), however slowly this machine starts Python and JAX.
        deadline = time.monotonic() + 90
        while _committed(d) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Every committed step is whole; the next start reclaims what the kill leaked.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepaxWarning)  # the killed manager's stale lock
            with keepax.CheckpointManager(d, incremental=True, staging_grace=0) as m:
                for s in m.all_steps():
                    _check_step(d, s)
                steps = m.all_steps()
        assert set(_store_files(d)) == _referenced(d)
        seen.update(steps)
    assert len(seen) >= 2  # the workers did commit steps before being killed


def test_kill_9_never_leaves_a_dangling_reference(tmp_path):
    _kill_trials(tmp_path, 2)


@pytest.mark.slow
def test_kill_9_many_trials(tmp_path):
    _kill_trials(tmp_path, 12)


def test_process_0_deletes_a_dead_store_file_only_once_announced_and_still_dead():
    from keepax._src.checkpoint.incremental import STORE_DATA, ChunkStore
    from keepax._src.io import open_root

    storage = open_root(f"memory://announce-{uuid.uuid4().hex}")
    a, b = f"{STORE_DATA}/x-p00001-000.safetensors", f"{STORE_DATA}/y-p00001-000.safetensors"
    for f in (a, b):
        storage.write_bytes(f, b"data")
    store = ChunkStore(storage, process=0, leader=True)
    store.register_files("s1", {a, b}, [])
    store.delete(store.release("s1"))
    assert storage.exists(a) and storage.exists(b)  # dead, but not announced yet
    announced = store.announce()
    assert announced == sorted([a, b])
    store.register_files("s2", {b}, [])  # a save that chose b before it heard commits
    store.heard(announced)
    assert not storage.exists(a) and storage.exists(b)
    assert store.announce() == []
    other = ChunkStore(storage, process=1, leader=False)  # never deletes
    other.register_files("s2", {b}, [])
    other.delete(other.release("s2"))
    other.heard([b])
    assert storage.exists(b)
