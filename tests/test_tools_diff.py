"""keepax.diff on identical, changed-value, changed-shape and added/removed-leaf pairs."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import keepax
from keepax._src.tools.diff import add_diff_parser, diff


def _tree(**changes):
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32),
            "step": 3, "name": "x"}
    tree.update(changes)
    return {k: v for k, v in tree.items() if v is not None}


def _save(root, name, tree):
    path = f"{root}/{name}"
    keepax.save(path, tree)
    return path


def test_identical_by_checksums(root):
    a, b = _save(root, "a", _tree()), _save(root, "b", _tree())
    result = diff(a, b)
    assert result.identical and result.summary() == "identical (4 leaves)"
    assert {d.decided_by for d in result.leaves if d.a["shape"]} == {"checksums"}


def test_changed_values(root):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    w2 = w.copy()
    w2[1, 2] += 0.5
    a, b = _save(root, "a", _tree()), _save(root, "b", _tree(w=w2, step=4))
    result = diff(a, b)
    assert not result.identical
    assert result.different == ["['step']", "['w']"] and result.equal == ["['b']", "['name']"]
    by_path = {d.path: d for d in result.leaves}
    assert by_path["['w']"].decided_by == "checksums" and by_path["['w']"].max_abs is None
    values = {d.path: d for d in diff(a, b, values=True).leaves}
    assert values["['w']"].max_abs == pytest.approx(0.5)
    assert values["['w']"].max_rel == pytest.approx(0.5 / 6)
    assert values["['b']"].max_abs == 0.0


def test_shape_dtype_added_removed(root):
    a = _save(root, "a", _tree())
    b = _save(root, "b", _tree(w=np.zeros((4, 4), np.float32), b=np.ones(4, np.float16),
                               name=None, extra=np.zeros(2)))
    result = diff(a, b)
    assert result.changed == ["['b']", "['w']"]
    by_path = {d.path: d for d in result.leaves}
    assert by_path["['w']"].changes == ("shape",) and by_path["['b']"].changes == ("dtype",)
    assert result.removed == ["['name']"] and result.added == ["['extra']"]
    assert result.summary() == "different: 1 added, 1 removed, 2 changed, 1 equal"


def test_other_chunk_layout_reads_values(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec("x")))
    a = _save(str(tmp_path), "a", {"w": w})
    b = _save(str(tmp_path), "b", {"w": sharded})
    (leaf,) = diff(a, b).leaves
    assert leaf.decided_by == "values" and leaf.status == "changed"
    assert leaf.changes == ("sharding",)  # the values are equal, the saved sharding is not
    c = _save(str(tmp_path), "c", {"w": jax.device_put(w + 1, NamedSharding(mesh,
                                                                             PartitionSpec("x")))})
    (leaf,) = diff(a, c).leaves
    assert leaf.status == "different" and leaf.decided_by == "values"


def test_cli_exit_codes_and_json(tmp_path, capsys):
    a = _save(str(tmp_path), "a", _tree())
    b = _save(str(tmp_path), "b", _tree(step=9))
    parser = argparse.ArgumentParser()
    add_diff_parser(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args(["diff", *argv])
        return args.run(args)

    assert run(a, a, "-q") == 0
    assert "identical" in capsys.readouterr().out
    assert run(a, b, "-q", "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is False and out["summary"].startswith("different")
    assert [d["path"] for d in out["leaves"] if d["status"] == "different"] == ["['step']"]
    assert run(a, str(tmp_path / "missing"), "-q") == 2
    assert "missing" in capsys.readouterr().err
