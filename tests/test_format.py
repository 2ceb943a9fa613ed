"""Data files: valid safetensors files, aligned, checksummed, written and read in batches."""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import keepax
from keepax._src.format import datafiles as fmt


def data_files(path) -> list[str]:
    return sorted(os.path.join(path, "data", f) for f in os.listdir(os.path.join(path, "data")))


def test_every_data_file_is_a_valid_safetensors_file(tmp_path) -> None:
    tree = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "bf16": jnp.arange(5, dtype=jnp.bfloat16),
        "f8": np.arange(4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
        "i4": np.arange(6, dtype=ml_dtypes.int4),
        "c64": np.array([1 + 2j, -3j], np.complex64),
        "scalar": np.int16(-3),
        "bool": np.array([True, False]),
    }
    keepax.save(tmp_path / "ckpt", tree)
    (file,) = data_files(tmp_path / "ckpt")
    # The safetensors library parses and validates the whole header (offsets contiguous and
    # covering the data, sizes matching shapes and dtypes).
    with safe_open(file, framework="numpy") as f:
        assert f.metadata()["format"] == "keepax"
        assert f.get_slice("['f8']").get_dtype() == "F8_E4M3"
        assert f.get_slice("['bf16']").get_dtype() == "BF16"
        assert f.get_slice("['f32']").get_shape() == [3, 4]
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in ("['f8']",)}
    np.testing.assert_array_equal(tensors["['f32']"], tree["f32"])
    np.testing.assert_array_equal(tensors["['scalar']"], tree["scalar"])
    np.testing.assert_array_equal(tensors["['bool']"], tree["bool"])
    bf16 = tensors["['bf16']"]
    assert bf16.dtype == ml_dtypes.bfloat16 or bf16.dtype.itemsize == 2
    # Dtypes without a safetensors code are raw bytes typed by our manifest.
    i4 = tensors["['i4']"]
    assert i4.dtype == np.uint8 and i4.tobytes() == tree["i4"].tobytes()
    assert tensors["['c64']"].tobytes() == tree["c64"].tobytes()
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert (8 + n) % 64 == 0
    assert header["__metadata__"]["format"] == "keepax"


def test_chunk_offsets_and_checksums_match_the_bytes(tmp_path) -> None:
    tree = {f"a{i}": np.full(100 + i, i, np.float32) for i in range(20)}
    keepax.save(tmp_path / "ckpt", tree)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_bytes())
    for leaf in manifest["leaves"]:
        (chunk,) = leaf["chunks"]
        name = manifest["files"][chunk["file"]]["name"]
        with open(tmp_path / "ckpt" / name, "rb") as f:
            f.seek(chunk["offset"])
            data = f.read(chunk["nbytes"])
        assert fmt.checksum(data) == chunk["crc32c"]


def test_many_small_arrays_are_batched_and_restore(tmp_path) -> None:
    tree = {f"v{i:05d}": np.full(256, i, np.float32) for i in range(3000)}
    result = keepax.save(tmp_path / "ckpt", tree)
    assert result.files == 1  # small state: one data file, no file per array
    stats = keepax.RestoreStats()
    back = keepax.restore(tmp_path / "ckpt", stats=stats)
    assert all(np.array_equal(back[k], v) for k, v in tree.items())
    assert stats.chunks_read == 3000 and stats.files_opened == 1


def test_restored_arrays_are_aligned_for_zero_copy(tmp_path) -> None:
    keepax.save(tmp_path / "ckpt", {"a": np.ones((1000, 33), np.float32), "b": np.ones(7)})
    back = keepax.restore(tmp_path / "ckpt")
    assert back["a"].ctypes.data % 64 == 0 and back["b"].ctypes.data % 64 == 0


def test_checksum_is_crc32c() -> None:
    # The standard CRC-32C check value (RFC 3720 test vector "123456789").
    assert fmt.checksum(b"123456789") == 0xE3069283
    assert fmt.checksum(b"6789", fmt.checksum(b"12345")) == 0xE3069283


@pytest.mark.parametrize("max_files", [1, 4])
def test_plan_spreads_bytes_evenly(max_files: int) -> None:
    sources = [
        fmt.ChunkSource(i, f"t{i}", (0,), (n,), np.dtype(np.uint8), lambda: None)
        for i, n in enumerate([100 << 20, 60 << 20, 50 << 20, 40 << 20, 10 << 20, 1])
    ]
    groups = fmt._plan_files(sources, max_files)
    assert len(groups) == max_files
    sizes = [sum(s.nbytes for s in g) for g in groups]
    assert sum(sizes) == sum(s.nbytes for s in sources)
    assert max(sizes) <= 100 << 20 or max_files == 1
    for g in groups:  # leaf order kept inside each file
        assert [s.leaf for s in g] == sorted(s.leaf for s in g)
