"""keepax.export: safetensors (Hugging Face layout), npz and HDF5, read back by the real
libraries; names, sharding into files, dtype handling, the CLI, and bounded memory."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import textwrap

import h5py
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file

import keepax
from keepax._src.tools.export import add_export_parser, export
from keepax.errors import KeepaxError, UnsupportedLeafError


def _state():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16),
                      "bias": rng.normal(size=(3,)).astype(np.float32)},
            "layers": [rng.normal(size=(2, 2)).astype(np.float32),
                       rng.integers(0, 9, size=(5,)).astype(np.int32)],
        },
        "step": 7,
        "name": "run-1",
    }


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "ckpt")
    keepax.save(path, _state(), metadata={"epoch": 3})
    return path


def _raw(a):
    return np.asarray(a).tobytes()


def test_safetensors_single_file_names_and_bytes(ckpt, tmp_path):
    out = tmp_path / "hf"
    result = export(ckpt, str(out))
    assert result.files == (str(out / "model.safetensors"),)
    tensors = load_file(str(out / "model.safetensors"))
    state = _state()
    assert set(tensors) == {"params.dense.kernel", "params.dense.bias", "params.layers.0",
                            "params.layers.1", "step"}
    assert tensors["params.dense.kernel"].dtype == ml_dtypes.bfloat16
    assert _raw(tensors["params.dense.kernel"]) == _raw(state["params"]["dense"]["kernel"])
    assert _raw(tensors["params.layers.1"]) == _raw(state["params"]["layers"][1])
    assert tensors["step"].shape == () and int(tensors["step"]) == 7
    assert result.skipped == {"['name']": "a str value (safetensors holds tensors only)"}
    with safetensors.safe_open(str(out / "model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "flax" and json.loads(meta["keepax.metadata"]) == {"epoch": 3}


def test_safetensors_shards_and_index(tmp_path):
    path = str(tmp_path / "big")
    leaves = {f"w{i}": np.full((256,), i, np.float32) for i in range(5)}  # 1 KiB each
    keepax.save(path, {"params": leaves})
    out = tmp_path / "hf"
    result = export(path, str(out), max_shard_size=2100, strip_prefix="params")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == 5 * 1024 == result.nbytes
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # The index resolves every tensor, as transformers' sharded loader does.
    for name, file in index["weight_map"].items():
        tensors = load_file(str(out / file))
        np.testing.assert_array_equal(tensors[name], leaves[name])
    for file in files:
        size = sum(t.nbytes for t in load_file(str(out / file)).values())
        assert size <= 2100
        with open(out / file, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        assert header % 8 == 0


def test_separator_select_dtype(ckpt, tmp_path):
    out = tmp_path / "hf"
    export(ckpt, str(out), select="params/dense", separator="/", dtype="float32")
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {"params/dense/kernel", "params/dense/bias"}
    assert tensors["params/dense/kernel"].dtype == np.float32
    np.testing.assert_array_equal(tensors["params/dense/kernel"],
                                  np.asarray(_state()["params"]["dense"]["kernel"], np.float32))


def test_unsupported_dtypes_error_or_convert(tmp_path):
    path = str(tmp_path / "odd")
    c = np.array([1 + 2j, -3.5j], np.complex64)
    i4 = np.array([1, -2, 7], ml_dtypes.int4)
    keepax.save(path, {"c": c, "i4": i4, "key": jax.random.key(3),
                       "f8": np.array([1.5, -2], ml_dtypes.float8_e4m3fn)})
    with pytest.raises(UnsupportedLeafError) as e:
        export(path, str(tmp_path / "x"))
    assert e.value.leaf == "['c']" and "convert=True" in str(e.value)
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")
    out = tmp_path / "hf"
    result = export(path, str(out), convert=True)
    assert result.converted == {"['c']": "complex64 -> float32", "['i4']": "int4 -> int8",
                                "['key']": "prngkey -> uint32"}
    with safetensors.safe_open(str(out / "model.safetensors"), "np") as f:
        got = {k: f.get_tensor(k) for k in ("c", "i4", "key")}
    np.testing.assert_array_equal(got["c"], np.stack([c.real, c.imag], -1))
    np.testing.assert_array_equal(got["i4"], i4.astype(np.int8))
    np.testing.assert_array_equal(got["key"], jax.random.key_data(jax.random.key(3)))
    # float8_e4m3fn is safetensors' F8_E4M3: stored as is (the Python loaders cannot make a
    # NumPy array of it, so read the header and bytes).
    data = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert header["f8"]["dtype"] == "F8_E4M3"
    begin, end = header["f8"]["data_offsets"]
    assert data[8 + n + begin:8 + n + end] == np.array([1.5, -2], ml_dtypes.float8_e4m3fn).tobytes()


def test_npz(ckpt, tmp_path):
    out = tmp_path / "w.npz"
    with pytest.raises(UnsupportedLeafError, match="bfloat16"):
        export(ckpt, str(out), "npz")
    export(ckpt, str(out), "npz", convert=True)
    with np.load(out) as z:
        assert set(z.files) == {"params.dense.kernel", "params.dense.bias", "params.layers.0",
                                "params.layers.1", "step", "name"}
        np.testing.assert_array_equal(z["params.layers.0"], _state()["params"]["layers"][0])
        assert z["params.dense.kernel"].dtype == np.float32
        assert str(z["name"]) == "run-1"
    with pytest.raises(KeepaxError, match="exists"):
        export(ckpt, str(out), "npz", convert=True)


def test_hdf5_groups_and_attributes(ckpt, tmp_path):
    out = tmp_path / "w.h5"
    export(ckpt, str(out), "hdf5", select=["params/layers", "name"])
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["keepax.metadata"]) == {"epoch": 3}
        assert isinstance(f["params"], h5py.Group) and isinstance(f["params/layers"], h5py.Group)
        np.testing.assert_array_equal(f["params/layers/1"][()], _state()["params"]["layers"][1])
        assert f["params/layers/1"].attrs["keepax.path"] == "['params']['layers'][1]"
        assert f["name"][()].decode() == "run-1"
        assert "dense" not in f["params"]


def test_cli(ckpt, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers())
    out = tmp_path / "hf"
    args = parser.parse_args(["export", ckpt, str(out), "--json", "-q"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["names"]["['step']"] == "step"
    args = parser.parse_args(["export", ckpt, str(out), "-q"])
    assert args.run(args) == 2  # exists
    assert "exists" in capsys.readouterr().err


_MEMORY_CHILD = textwrap.dedent("""
    import json, os, sys
    import psutil
    import keepax
    from keepax._src.tools.export import export
    ck = keepax.open(sys.argv[1])
    base = psutil.Process().memory_info().rss
    export(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="64MiB")
    # VmHWM (this process's peak RSS; ru_maxrss would carry the parent's across exec).
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
    print(json.dumps({"extra": peak - base}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_memory_one_leaf(tmp_path, fmt):
    leaf = 16 << 20
    path = str(tmp_path / "big")
    keepax.save(path, {f"w{i}": np.full(leaf // 4, i, np.float32) for i in range(24)})  # 384 MiB
    out = str(tmp_path / ("hf" if fmt == "safetensors" else "w.npz"))
    run = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, path, out, fmt],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    extra = json.loads(run.stdout.strip().splitlines()[-1])["extra"]
    assert extra < (64 << 20) + leaf, extra  # the state is 24 leaves
