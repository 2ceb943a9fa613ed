"""Single-file checkpoints (``save_file``/``load_file``): a scientific optimizer's state in one
safetensors-compatible file, with the semantics of ``restore`` and the guarantees of ``save``."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy
from safetensors import safe_open

import keepax
from keepax import errors
from keepax._src.io import local

# ---------------------------------------------------------------------------------------------
# A realistic optimizer state.


def cost(params: dict[str, jax.Array]) -> jax.Array:
    return jnp.sum((params["w"] - jnp.arange(3.0)) ** 2) + 2.0 * (params["b"] + 1.0) ** 2


@jax.jit(static_argnums=0)
def lbfgs_step(opt: optax.GradientTransformation, params: Any, state: Any) -> tuple[Any, Any, Any]:
    value, grad = optax.value_and_grad_from_state(cost)(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=cost)
    return optax.apply_updates(params, updates), state, value


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    """Three L-BFGS iterations: the optimizer, its state, and the solver's bookkeeping."""
    opt = optax.lbfgs(memory_size=4)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    opt_state = opt.init(params)
    history = []
    for i in range(3):
        params, opt_state, value = lbfgs_step(opt, params, opt_state)
        history.append({
            "phase": "coarse" if i < 2 else "fine",
            "iteration": i,
            "cost": float(value),
            "accepted": True,
            "step_size": opt_state[2].learning_rate,  # a jax scalar inside the history
            "params": params["w"],  # a jax vector inside the history
        })
    rng = np.random.default_rng(0)
    jacobian = rng.standard_normal((20, 5))
    residual = rng.standard_normal(20)
    state = {
        "opt_state": opt_state,
        "params": params,
        "JtJ": jacobian.T @ jacobian,  # float64 NumPy accumulators
        "Jtr": jacobian.T @ residual,
        "best": {"params": params, "cost": float(cost(params)), "iteration": 2},
        "normalizer": {
            "scale": np.array([1.5, 2.0, 1e-3]),
            "offset": jnp.array([0.1, -0.2, 0.0], jnp.float32),
        },
        "history": history,
        "note": None,
    }
    return {"opt": opt, "state": state}


def assert_identical(got: Any, want: Any) -> None:
    """Same structure, same leaf kinds (jax.Array, NumPy, Python types), same bits."""
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        where = jax.tree_util.keystr(path)
        if isinstance(b, jax.Array):
            assert isinstance(a, jax.Array), where
        elif isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and not isinstance(a, jax.Array), where
        else:
            assert type(a) is type(b) and a == b, where
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where


def header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def manifest_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(header(path)[1]["__metadata__"]["manifest"])


def hidden_entries(directory: str | os.PathLike[str]) -> list[str]:
    return [n for n in os.listdir(directory) if ".keepax-" in n]


# ---------------------------------------------------------------------------------------------
# Round trips.


def test_optimizer_state_round_trips_bit_exactly(root: str, run: dict[str, Any]) -> None:
    state = run["state"]
    result = keepax.save_file(f"{root}/opt.keepax", state, metadata={"problem": "fit", "n": 20})
    assert result.files == 1 and result.path.endswith("opt.keepax")
    back = keepax.load_file(f"{root}/opt.keepax", like=state)
    assert_identical(back, state)
    assert type(back["opt_state"][0]) is type(state["opt_state"][0])  # ScaleByLBFGSState
    # Continuing from the loaded state gives bit for bit what continuing the original gives.
    opt = run["opt"]
    want = lbfgs_step(opt, state["params"], state["opt_state"])
    got = lbfgs_step(opt, back["params"], back["opt_state"])
    assert_identical(got, want)


def test_history_with_jax_arrays_is_stored_as_arrays_not_pickles(tmp_path, run) -> None:
    history = run["state"]["history"]
    keepax.save_file(tmp_path / "h.keepax", {"history": history})
    leaves = {leaf["path"]: leaf for leaf in manifest_of(tmp_path / "h.keepax")["leaves"]}
    assert leaves["['history'][0]['params']"]["type"] == "jax"
    assert leaves["['history'][0]['step_size']"]["shape"] == []
    assert leaves["['history'][2]['phase']"] == {
        "path": "['history'][2]['phase']", "type": "str", "value": "fine"
    }
    assert_identical(keepax.load_file(tmp_path / "h.keepax", like={"history": history}),
                     {"history": history})
    # Without like: plain lists and dicts of NumPy arrays and Python values, JSON-able at once.
    plain = keepax.load_file(tmp_path / "h.keepax")["history"]
    assert isinstance(plain, list) and [h["phase"] for h in plain] == ["coarse", "coarse", "fine"]
    assert plain[1]["iteration"] == 1 and plain[1]["accepted"] is True
    assert plain[2]["cost"] == history[2]["cost"]
    assert type(plain[0]["params"]) is np.ndarray
    json.dumps(jax.tree.map(lambda x: x.tolist() if isinstance(x, np.ndarray) else x, plain))


def test_without_like_returns_numpy_and_plain_containers(tmp_path, run) -> None:
    state = run["state"]
    keepax.save_file(tmp_path / "opt.keepax", state)
    plain = keepax.load_file(tmp_path / "opt.keepax")
    for leaf in jax.tree.leaves(plain):
        assert not isinstance(leaf, jax.Array)
    lbfgs = plain["opt_state"][0]  # the namedtuple comes back as a dict of its fields
    assert set(lbfgs) >= {"count", "diff_params_memory", "weights_memory"}
    assert np.asarray(lbfgs["diff_params_memory"]["w"]).tobytes() == np.asarray(
        state["opt_state"][0].diff_params_memory["w"]).tobytes()
    assert plain["JtJ"].dtype == np.float64 and np.array_equal(plain["JtJ"], state["JtJ"])
    assert plain["best"]["cost"] == state["best"]["cost"] and plain["note"] is None


def test_root_leaf_empty_tree_and_many_dtypes(root: str) -> None:
    keepax.save_file(f"{root}/leaf", jnp.arange(3))
    assert np.array_equal(keepax.load_file(f"{root}/leaf"), np.arange(3, dtype=np.int32))
    keepax.save_file(f"{root}/empty", {})
    assert keepax.load_file(f"{root}/empty") == {}
    tree = {
        "bf16": jnp.arange(4, dtype=jnp.bfloat16),
        "i4": np.array([1, -2, 7], ml_dtypes.int4),
        "c128": np.array([1 + 2j, -0.0j]),
        "key": jax.random.key(7),
        "blob": b"\x00\xffraw",
        "nan": float("nan"),
        "big": 2**80,
        "z": complex(1, -2),
        "zero_size": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    }
    keepax.save_file(f"{root}/dtypes", tree)
    back = keepax.load_file(f"{root}/dtypes", like=tree)
    for k in ("bf16", "i4", "c128", "zero_size", "fortran"):
        assert np.asarray(back[k]).tobytes() == np.asarray(tree[k]).tobytes()
        assert back[k].dtype == tree[k].dtype and back[k].shape == tree[k].shape
    assert np.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(tree["key"]))
    assert back["blob"] == tree["blob"] and back["big"] == 2**80 and back["z"] == tree["z"]
    assert struct.pack(">d", back["nan"]) == struct.pack(">d", tree["nan"])


def test_sharded_arrays_and_shardings_in_like(tmp_path) -> None:
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    spec = jax.sharding.PartitionSpec("x")
    sharded = jax.device_put(jnp.arange(32.0).reshape(8, 4), jax.sharding.NamedSharding(mesh, spec))
    keepax.save_file(tmp_path / "s.keepax", {"w": sharded})
    (leaf,) = manifest_of(tmp_path / "s.keepax")["leaves"]
    assert len(leaf["chunks"]) == 4  # one chunk per shard, all in the one file
    other_mesh = jax.make_mesh((2,), ("y",), devices=jax.devices()[4:6])
    target = jax.sharding.NamedSharding(other_mesh, jax.sharding.PartitionSpec(None, "y"))
    like = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target)}
    back = keepax.load_file(tmp_path / "s.keepax", like=like)
    assert back["w"].sharding == target
    assert np.array_equal(np.asarray(back["w"]), np.asarray(sharded))


# ---------------------------------------------------------------------------------------------
# like / select / partial / dtype: exactly restore's semantics.


def restore_options(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    half = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float16)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
        else x,
        state["best"],
    )
    structs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, state
    )
    return {
        "select list": {"select": ["history"]},
        "select path": {"select": "best/params"},
        "select tuples": {"select": [("normalizer", "scale"), "JtJ"]},
        "partial": {"like": {"JtJ": state["JtJ"], "best": state["best"]}, "partial": True},
        "select+like": {"like": {"best": state["best"]}, "select": ["best"]},
        "dtype like": {"like": {"best": half}, "select": ["best"], "dtype": "like"},
        "dtype all": {"dtype": jnp.bfloat16},
        "structs": {"like": structs},
    }


@pytest.mark.parametrize("option", ["select list", "select path", "select tuples", "partial",
                                    "select+like", "dtype like", "dtype all", "structs"])
def test_options_behave_exactly_as_restore(tmp_path, run, option: str) -> None:
    state = run["state"]
    keepax.save(tmp_path / "dir", state)
    keepax.save_file(tmp_path / "one.keepax", state)
    kwargs = restore_options(state)[option]
    assert_identical(keepax.load_file(tmp_path / "one.keepax", **kwargs),
                     keepax.restore(tmp_path / "dir", **kwargs))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"like": {"JtJ": np.zeros((5, 5))}}, r"\['Jtr'\].*partial=True"),
        ({"like": {"JtJ": np.zeros((4, 5))}, "partial": True}, r"shape \(5, 5\).*\(4, 5\)"),
        ({"like": {"JtJ": np.zeros((5, 5), np.float32)}, "partial": True}, "dtype='like'"),
        ({"like": {"missing": np.zeros(1)}, "partial": True}, "in like but not in the checkpoint"),
        ({"select": ["nope"]}, "matches no leaf"),
    ],
)
def test_mismatches_raise_restores_errors(tmp_path, run, kwargs, error) -> None:
    state = run["state"]
    keepax.save(tmp_path / "dir", state)
    keepax.save_file(tmp_path / "one.keepax", state)
    with pytest.raises(errors.KeepaxError, match=error) as from_file:
        keepax.load_file(tmp_path / "one.keepax", **kwargs)
    with pytest.raises(errors.KeepaxError, match=error) as from_dir:
        keepax.restore(tmp_path / "dir", **kwargs)
    assert type(from_file.value) is type(from_dir.value)
    assert from_file.value.leaf == from_dir.value.leaf


def test_select_reads_only_the_selected_bytes(tmp_path) -> None:
    tree = {"small": np.ones(4, np.float32), "big": np.zeros((256, 256))}
    keepax.save_file(tmp_path / "f", tree)
    # Damage "big": a select that skips it never reads it, so never notices.
    chunk = manifest_of(tmp_path / "f")["leaves"][0]["chunks"][0]
    with open(tmp_path / "f", "r+b") as f:
        f.seek(chunk["offset"] + 100)
        f.write(b"\x01")
    assert np.array_equal(keepax.load_file(tmp_path / "f", select="small")["small"], tree["small"])
    with pytest.raises(errors.CorruptCheckpointError):
        keepax.load_file(tmp_path / "f")


# ---------------------------------------------------------------------------------------------
# The file is a safetensors file.


def test_the_file_opens_with_safetensors(tmp_path, run) -> None:
    state = run["state"]
    path = tmp_path / "opt.keepax"
    keepax.save_file(path, state, metadata={"solver": "lbfgs"})
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "keepax-file" and meta["format_version"] == "1.0"
    manifest = json.loads(meta["manifest"])
    assert manifest["format"] == "keepax" and manifest["metadata"] == {"solver": "lbfgs"}
    assert manifest["files"] == [{"name": "data/self.safetensors", "nbytes": path.stat().st_size}]
    np.testing.assert_array_equal(tensors["['JtJ']"], state["JtJ"])
    np.testing.assert_array_equal(tensors["['best']['params']['w']"], state["best"]["params"]["w"])
    np.testing.assert_array_equal(tensors["['history'][1]['params']"],
                                  state["history"][1]["params"])
    n, _ = header(path)
    assert (8 + n) % 64 == 0
    # Chunk offsets in the manifest are absolute, right after the header.
    offsets = sorted(c["offset"] for leaf in manifest["leaves"] for c in leaf.get("chunks", []))
    assert offsets[0] == 8 + n


# ---------------------------------------------------------------------------------------------
# Damage and versions.


def _save(tmp_path, run) -> tuple[Any, dict[str, Any]]:
    path = tmp_path / "opt.keepax"
    keepax.save_file(path, run["state"])
    return path, manifest_of(path)


def test_flipped_data_byte_names_the_leaf(tmp_path, run) -> None:
    path, manifest = _save(tmp_path, run)
    leaf = next(x for x in manifest["leaves"] if x["path"] == "['JtJ']")
    with open(path, "r+b") as f:
        f.seek(leaf["chunks"][0]["offset"] + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(errors.CorruptCheckpointError, match="checksum mismatch") as e:
        keepax.load_file(path)
    assert e.value.leaf == "['JtJ']" and e.value.path == str(path)
    assert "opt.keepax at bytes" in str(e.value)


@pytest.mark.parametrize("keep", [1, 7, 8, 500, -1], ids=lambda k: f"keep{k}")
def test_truncated_file(tmp_path, run, keep: int) -> None:
    path, _ = _save(tmp_path, run)
    size = path.stat().st_size
    os.truncate(path, size + keep if keep < 0 else keep)
    with pytest.raises(errors.CorruptCheckpointError, match="damaged or is not a keepax"):
        keepax.load_file(path)


def test_extended_file(tmp_path, run) -> None:
    path, _ = _save(tmp_path, run)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(errors.CorruptCheckpointError, match="truncated or extended"):
        keepax.load_file(path)


def test_bad_header_json(tmp_path, run) -> None:
    path, _ = _save(tmp_path, run)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"X")
    with pytest.raises(errors.CorruptCheckpointError, match="not valid JSON"):
        keepax.load_file(path)


def test_modified_manifest_fails_its_checksum(tmp_path, run) -> None:
    path, _ = _save(tmp_path, run)
    data = path.read_bytes()
    # The best iteration is a value leaf: it lives only in the manifest, under its CRC-32C.
    leaf = b"""['best']['iteration']\\",\\"type\\":\\"int\\",\\"value\\":"""
    assert data.count(leaf + b"2") == 1
    path.write_bytes(data.replace(leaf + b"2", leaf + b"3"))
    with pytest.raises(errors.CorruptCheckpointError, match="does not match its checksum"):
        keepax.load_file(path)


def _rewrite_metadata(path, **changes: Any) -> None:
    """Rewrites the header's __metadata__ (the data then no longer lies at the manifest's
    offsets: only checks made before reading data can pass)."""
    n, doc = header(path)
    data = path.read_bytes()[8 + n:]
    doc["__metadata__"].update(changes)
    doc["__metadata__"] = {k: v for k, v in doc["__metadata__"].items() if v is not None}
    text = json.dumps(doc).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_newer_major_version_is_rejected(tmp_path, run) -> None:
    path, _ = _save(tmp_path, run)
    _rewrite_metadata(path, format_version="2.0", manifest="garbage written by keepax 2")
    with pytest.raises(errors.FormatVersionError, match="format 2.0.*upgrade keepax"):
        keepax.load_file(path)


def test_newer_minor_version_is_read(tmp_path, run) -> None:
    path, _ = _save(tmp_path, run)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"format_version":"1.0"', b'"format_version":"1.7"', 1))
    assert_identical(keepax.load_file(path, like=run["state"]), run["state"])


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"format": "other"}, "format is 'other', expected 'keepax-file'"),
        ({"format": "keepax"}, "keepax.restore"),
        ({"format_version": "1"}, "MAJOR.MINOR"),
        ({"format_version": "0.9"}, "unknown keepax single-file format"),
        ({"manifest_crc32c": None}, "lacks the manifest"),
        ({"manifest": "{}"}, "does not match its checksum"),
    ],
)
def test_bad_metadata(tmp_path, run, changes, error) -> None:
    path, _ = _save(tmp_path, run)
    _rewrite_metadata(path, **changes)
    with pytest.raises(errors.KeepaxError, match=error):
        keepax.load_file(path)


def test_newer_manifest_version_inside_is_rejected(tmp_path) -> None:
    path = tmp_path / "f"
    keepax.save_file(path, {"a": 1})
    text = header(path)[1]["__metadata__"]["manifest"].replace('"version":"1.0"', '"version":"3.1"')
    from keepax._src.format.datafiles import checksum

    _rewrite_metadata(path, manifest=text, manifest_crc32c=str(checksum(text.encode())))
    with pytest.raises(errors.FormatVersionError, match="upgrade"):
        keepax.load_file(path)


def test_other_files_are_not_single_file_checkpoints(tmp_path) -> None:
    safetensors.numpy.save_file({"a": np.ones(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(errors.CorruptCheckpointError, match="no __metadata__"):
        keepax.load_file(tmp_path / "plain.safetensors")
    keepax.save(tmp_path / "dir", {"a": np.ones(3)})
    (data_file,) = os.listdir(tmp_path / "dir" / "data")
    with pytest.raises(errors.CorruptCheckpointError, match="keepax.restore"):
        keepax.load_file(tmp_path / "dir" / "data" / data_file)
    with pytest.raises(errors.CheckpointNotFoundError, match="directory.*keepax.restore"):
        keepax.load_file(tmp_path / "dir")
    with pytest.raises(errors.CheckpointNotFoundError, match="does not exist"):
        keepax.load_file(tmp_path / "nothing.keepax")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(errors.CorruptCheckpointError, match="0 bytes"):
        keepax.load_file(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Writing: no-replace, atomic overwrite, nothing left behind.


def test_existing_file_is_not_replaced(tmp_path) -> None:
    path = tmp_path / "f.keepax"
    keepax.save_file(path, {"a": np.ones(3)})
    before, stat = path.read_bytes(), path.stat()
    with pytest.raises(errors.CheckpointExistsError, match="overwrite=True"):
        keepax.save_file(path, {"a": np.zeros(3)})
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert hidden_entries(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(errors.CheckpointExistsError, match="directory"):
        keepax.save_file(tmp_path / "d", {"a": 1}, overwrite=True)


def test_no_replace_and_overwrite_in_memory(root: str) -> None:
    keepax.save_file(f"{root}/f", {"a": 1})
    with pytest.raises(errors.CheckpointExistsError, match="overwrite=True"):
        keepax.save_file(f"{root}/f", {"a": 2})
    assert keepax.load_file(f"{root}/f") == {"a": 1}
    keepax.save_file(f"{root}/f", {"a": 3}, overwrite=True)
    assert keepax.load_file(f"{root}/f") == {"a": 3}


def test_file_created_during_the_save_is_not_replaced(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.keepax"
    path.write_bytes(b"someone else's")
    monkeypatch.setattr(local.LocalStorage, "exists", lambda self, p: False)  # lose the race
    with pytest.raises(errors.CheckpointExistsError, match="another save"):
        keepax.save_file(path, {"a": np.ones(3)})
    assert path.read_bytes() == b"someone else's"
    assert hidden_entries(tmp_path) == []


def test_overwrite_replaces_atomically(tmp_path) -> None:
    path = tmp_path / "f.keepax"
    keepax.save_file(path, {"a": np.ones(3)})
    with open(path, "rb") as old:  # a reader of the old file keeps reading the old file
        keepax.save_file(path, {"b": np.zeros(2)}, overwrite=True)
        assert b"keepax-file" in old.read()
        assert os.fstat(old.fileno()).st_ino != path.stat().st_ino
    assert list(keepax.load_file(path)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["f.keepax"]


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.keepax"
    keepax.save_file(path, {"a": np.ones(3)})
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(local.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        keepax.save_file(path, {"b": np.zeros(2)}, overwrite=True)
    with pytest.raises(OSError, match="I/O error"):
        keepax.save_file(tmp_path / "new.keepax", {"b": np.zeros(2)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["f.keepax"]


def test_unsupported_leaf_writes_nothing(tmp_path) -> None:
    with pytest.raises(errors.UnsupportedLeafError, match=r"\['bad'\]"):
        keepax.save_file(tmp_path / "f", {"bad": object()})
    with pytest.raises(errors.KeepaxError, match="JSON-serialisable"):
        keepax.save_file(tmp_path / "f", {"a": 1}, metadata={"x": np.ones(2)})
    assert os.listdir(tmp_path) == []


def test_paths(tmp_path, monkeypatch) -> None:
    with pytest.raises(errors.KeepaxError, match="local paths"):
        keepax.save_file("s3://bucket/opt.keepax", {"a": 1})
    with pytest.raises(errors.KeepaxError, match="local paths"):
        keepax.load_file("gs://bucket/opt.keepax")
    with pytest.raises(errors.KeepaxError, match=r"\.keepax-"):
        keepax.save_file(tmp_path / "x.keepax-tmp-1", {"a": 1})
    with pytest.raises(errors.CheckpointNotFoundError, match="temporary"):
        keepax.load_file(tmp_path / "x.keepax-tmp-1")
    # Parent directories are created; file:// URLs and relative paths work.
    keepax.save_file(f"file://{tmp_path}/sub/dir/f.keepax", {"a": 1})
    assert keepax.load_file(tmp_path / "sub" / "dir" / "f.keepax") == {"a": 1}
    monkeypatch.chdir(tmp_path / "sub")
    keepax.save_file("g.keepax", {"b": 2})
    assert keepax.load_file(f"file://{tmp_path}/sub/g.keepax") == {"b": 2}


# ---------------------------------------------------------------------------------------------
# Metadata back, inspect, and temporaries of interrupted saves (issue 13 point 14).


def test_load_file_with_metadata(tmp_path) -> None:
    tree = {"x": np.arange(3.0), "cost": 0.5}
    keepax.save_file(tmp_path / "fit.keepax", tree, metadata={"phase": "lbfgs", "n": [1, 2]})
    got, metadata = keepax.load_file(tmp_path / "fit.keepax", with_metadata=True)
    assert_identical(got, tree)
    assert metadata == {"phase": "lbfgs", "n": [1, 2]}
    keepax.save_file(tmp_path / "plain.keepax", tree)
    assert keepax.load_file(tmp_path / "plain.keepax", with_metadata=True)[1] == {}


def test_inspect_file_describes_a_single_file(tmp_path) -> None:
    from keepax._src.checkpoint.single_file import inspect_file  # noqa: PLC0415

    tree = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "cost": 0.25, "tag": "best"}
    keepax.save_file(tmp_path / "fit.keepax", tree, metadata={"phase": 2})
    info = inspect_file(tmp_path / "fit.keepax")
    assert isinstance(info, keepax.CheckpointInfo)
    assert info.metadata == {"phase": 2}
    assert info.path == str(tmp_path / "fit.keepax")
    by_path = {leaf.path: leaf for leaf in info.leaves}
    assert by_path["['x']"].shape == (2, 3) and by_path["['x']"].dtype == "float32"
    assert by_path["['cost']"].value == 0.25 and by_path["['tag']"].value == "best"
    assert info.nbytes == 24
    assert info.files == (("fit.keepax", os.path.getsize(tmp_path / "fit.keepax")),)
    with pytest.raises(errors.CheckpointNotFoundError):
        inspect_file(tmp_path / "missing.keepax")
    with open(tmp_path / "fit.keepax", "r+b") as f:
        f.seek(20)
        f.write(b"\x00")
    with pytest.raises(errors.CorruptCheckpointError):
        inspect_file(tmp_path / "fit.keepax")


def test_next_save_removes_stale_temporaries(tmp_path) -> None:
    keepax.save_file(tmp_path / "fit.keepax", {"a": 1})
    # What a save killed mid-write leaves: a hidden temporary of this name (and others').
    stale = [tmp_path / "fit.keepax.keepax-tmp-0123456789ab",
             tmp_path / "fit.keepax.keepax-tmp-ba9876543210"]
    for path in stale:
        path.write_bytes(b"partial")
    other = tmp_path / "other.keepax.keepax-tmp-0123456789ab"  # another file's: kept
    other.write_bytes(b"partial")
    not_ours = tmp_path / "fit.keepax.keepax-tmp-notatemp"  # not keepax's name pattern: kept
    not_ours.write_bytes(b"x")
    staging_dir = tmp_path / "fit.keepax.keepax-tmp-aaaaaaaaaaaa"  # a directory save's: kept
    staging_dir.mkdir()
    keepax.save_file(tmp_path / "fit.keepax", {"a": 2}, overwrite=True)
    assert keepax.load_file(tmp_path / "fit.keepax") == {"a": 2}
    assert sorted(hidden_entries(tmp_path)) == sorted(
        p.name for p in (other, not_ours, staging_dir))


def test_a_save_in_progress_keeps_its_temporary(tmp_path) -> None:
    """Another process's save holds the directory lock: its temporary is never removed, and
    the next save waits for it instead."""
    import fcntl  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    temp = tmp_path / "fit.keepax.keepax-tmp-0123456789ab"
    temp.write_bytes(b"being written")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        fd = os.open(tmp_path, os.O_RDONLY)
        try:  # the lock is held: a save_file now would wait
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert temp.exists()
    finally:
        holder.communicate("")  # the holder exits: its lock is released
    keepax.save_file(tmp_path / "fit.keepax", {"a": 1})
    assert hidden_entries(tmp_path) == []
