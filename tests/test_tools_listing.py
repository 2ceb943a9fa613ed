"""The JSON output of ls/show/verify and ls's metrics columns with the best step marked."""

from __future__ import annotations

import json

import numpy as np

import keepax
from keepax._src.tools.listing import best_of, format_ls, ls_json, show_json, verify_json


def _steps(tmp_path):
    run = str(tmp_path / "run")
    with keepax.CheckpointManager(run, async_save=False) as mngr:
        for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
            mngr.save(step, {"w": np.ones(3)}, metrics={"loss": loss, "acc": step / 4})
    with keepax.CheckpointManager(run, read_only=True) as mngr:
        return run, [mngr.metadata(s) for s in mngr.all_steps()]


def test_ls_json_and_table(tmp_path):
    run, steps = _steps(tmp_path)
    out = json.loads(json.dumps(ls_json(run, steps), allow_nan=False))
    assert out["latest"] == 3 and out["metrics"] == ["acc", "loss"]
    assert out["best"] == {"step": 2, "metric": "loss", "mode": "min"}
    assert [s["best"] for s in out["steps"]] == [False, True, False]
    assert out["steps"][0]["metrics"] == {"loss": 3.0, "acc": 0.25}
    assert best_of(steps, ("acc", "max")) == 3
    text = format_ls(run, steps)
    header, _, *rows = text.splitlines()[:5]
    assert "acc" in header and "loss" in header
    assert rows[1].startswith("*") and not rows[0].startswith("*")
    assert "best 2 (* by loss, min)" in text


def test_show_and_verify_json(tmp_path):
    path = str(tmp_path / "ck")
    keepax.save(path, {"w": np.zeros((2, 3), np.float32), "n": 4, "s": "x", "c": 1 + 2j},
                metadata={"a": 1})
    info = keepax.inspect(path)
    out = json.loads(json.dumps(show_json(info), allow_nan=False))
    leaves = {leaf["path"]: leaf for leaf in out["leaves"]}
    assert leaves["['w']"]["shape"] == [2, 3] and leaves["['w']"]["dtype"] == "float32"
    assert leaves["['n']"]["value"] == 4 and leaves["['c']"]["value"] == [1.0, 2.0]
    assert out["nbytes"] == 24 and out["metadata"] == {"a": 1}
    assert verify_json(path, [], info) == {"path": path, "ok": True, "problems": [],
                                           "leaves": 4, "nbytes": 24}
    assert verify_json(path, ["bad"])["ok"] is False
