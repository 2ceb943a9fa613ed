"""keepax.gc: a dry run shows, apply removes; old staging goes, young staging, foreign entries
and the newest step stay; the keep policies decide the steps."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest

import keepax
from keepax import policies
from keepax._src.tools.gc import add_gc_parser, gc


def _run(directory, steps=(1, 2, 3, 4, 5)):
    with keepax.CheckpointManager(directory, async_save=False) as mngr:
        for step in steps:
            mngr.save(step, {"w": np.full(4, step, np.float32)}, metrics={"loss": 10.0 - step})
    return directory


def _age(path, seconds):
    old = time.time() - seconds
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(base, name), (old, old))
    os.utime(path, (old, old))


def test_dry_run_then_apply(tmp_path):
    run = _run(str(tmp_path / "run"))
    old = tmp_path / "run" / "00000006.keepax-tmp-0123456789ab"
    (old / "data").mkdir(parents=True)
    (old / "data" / "p00000-000.safetensors").write_bytes(b"x" * 10)
    _age(old, 3600)
    young = tmp_path / "run" / "00000007.keepax-tmp-ba9876543210"
    young.mkdir()
    (tmp_path / "run" / "notes").mkdir()

    dry = gc(run, keep=[policies.KeepLast(2)])
    assert not dry.applied
    assert [(i.kind, i.step) for i in dry.remove] == [("leftover", None), ("step", 1),
                                                       ("step", 2), ("step", 3)]
    assert dry.remove[0].name == old.name and dry.remove[0].age >= 3500
    assert sorted(dry.keep) == [4, 5]
    assert {i.name: i.kind for i in dry.left} == {young.name: "leftover", "notes": "unreadable"}
    assert old.exists()  # a dry run touches nothing
    with pytest.warns(keepax.KeepaxWarning, match="notes"):
        with keepax.CheckpointManager(run, read_only=True) as mngr:
            assert mngr.all_steps() == [1, 2, 3, 4, 5]

    done = gc(run, keep=[policies.KeepLast(2)], apply=True)
    assert done.applied and len(done.remove) == 4
    assert not old.exists() and young.exists() and (tmp_path / "run" / "notes").exists()
    with pytest.warns(keepax.KeepaxWarning, match="notes"):
        with keepax.CheckpointManager(run, read_only=True) as mngr:
            assert mngr.all_steps() == [4, 5]


def test_without_policies_keeps_every_permanent_step(tmp_path):
    run = _run(str(tmp_path / "run"), steps=(1, 2))
    result = gc(run, apply=True)
    assert result.remove == () and sorted(result.keep) == [1, 2]


def test_never_the_newest_step(tmp_path):
    run = _run(str(tmp_path / "run"))
    result = gc(run, keep=[policies.KeepBest(1, "loss", mode="max")])  # step 1 is "best"
    assert [i.step for i in result.remove] == [2, 3, 4]
    assert sorted(result.keep) == [1, 5]


def test_config_file_and_cli_json(tmp_path, capsys):
    run = _run(str(tmp_path / "run"))
    with keepax.CheckpointManager(run, keep=[policies.KeepLast(3)], read_only=True) as mngr:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(mngr.to_config()))
    parser = argparse.ArgumentParser()
    add_gc_parser(parser.add_subparsers())
    args = parser.parse_args(["gc", run, "--config", str(config), "--json"])
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["applied"] is False and [i["step"] for i in out["remove"]] == [1, 2]
    args = parser.parse_args(["gc", run, "--keep-best", "1:loss:min", "--apply"])
    assert args.run(args) == 0
    assert "removed" in capsys.readouterr().out
    with keepax.CheckpointManager(run, read_only=True) as mngr:
        assert mngr.all_steps() == [5]


def test_unreferenced_chunk_store_files_are_listed_then_removed(tmp_path):
    run = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    base = rng.standard_normal(4096).astype(np.float32)
    with keepax.CheckpointManager(run, incremental=True, async_save=False) as mngr:
        for step in (1, 2):
            mngr.save(step, {"base": base, "head": np.full(8, step, np.float32)})
    data = tmp_path / "run" / ".keepax-store" / "data"
    live = sorted(p.name for p in data.iterdir())
    assert live
    old = data / "orphan-old.safetensors"  # what a save killed after writing it leaves
    old.write_bytes(b"x" * 64)
    _age(old, 3600)
    young = data / "orphan-young.safetensors"
    young.write_bytes(b"y" * 64)

    dry = gc(run)
    stored = {i.name: i for i in dry.remove + dry.left if i.kind == "store"}
    assert sorted(stored) == [f".keepax-store/data/{n}" for n in (old.name, young.name)]
    assert stored[f".keepax-store/data/{old.name}"] in dry.remove
    assert stored[f".keepax-store/data/{young.name}"] in dry.left
    assert old.exists()

    done = gc(run, apply=True)
    assert [i.name for i in done.remove] == [f".keepax-store/data/{old.name}"]
    assert not old.exists() and young.exists()
    assert sorted(p.name for p in data.iterdir()) == sorted([*live, young.name])
    with keepax.CheckpointManager(run, read_only=True) as mngr:
        np.testing.assert_array_equal(mngr.restore(1)["base"], base)


def test_unfinished_uploads_are_listed_then_aborted(s3):
    run = f"{s3.url}/run"
    with keepax.CheckpointManager(run, storage_options=s3.options, async_save=False) as mngr:
        mngr.save(1, {"w": np.ones(4, np.float32)})
    client = s3.client()
    key = "run/00000002/data/p00000-000.safetensors"
    dead = client.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]

    def uploads():
        return [u["UploadId"] for u in
                client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])]

    # (moto dates every upload 2010-11-10: a grace longer than that leaves it.)
    young = gc(run, storage_options=s3.options, grace=10**10)
    assert [(i.kind, i.name) for i in young.left] == [("upload", key[len("run/"):])]
    assert young.remove == ()
    dry = gc(run, storage_options=s3.options)
    assert [(i.kind, i.name) for i in dry.remove] == [("upload", key[len("run/"):])]
    assert uploads() == [dead]  # a dry run aborts nothing
    done = gc(run, storage_options=s3.options, apply=True)
    assert done.applied and [i.kind for i in done.remove] == ["upload"]
    assert uploads() == []
