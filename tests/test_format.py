"""Data files: valid safetensors files, aligned, checksummed, written and read in batches."""

from __future__ import annotations

import json
import os
import re
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


# ---------------------------------------------------------------------------------------------
# check_header: the safetensors header matches the manifest (issue 12 point 8).


def _header_problems(path) -> list[str]:
    from keepax._src.checkpoint import inspection, opening  # noqa: PLC0415 - the layer above
    from keepax._src.io import split_checkpoint_path  # noqa: PLC0415

    storage, name = split_checkpoint_path(str(path))
    opened = opening.open_path(str(path))
    return fmt.check_headers(storage, name, inspection.resolved_manifest(opened), where=str(path))


def _edit_header(file: str, edit) -> None:
    """Rewrites a data file's header (same length, re-padded), keeping the data bytes."""
    with open(file, "rb") as f:
        raw = f.read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the edit must not lengthen the header"
    with open(file, "wb") as f:
        f.write(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :])


def _sharded_tree():
    return {"w": np.arange(24, dtype=np.float32).reshape(4, 6),
            "i4": np.arange(6, dtype=ml_dtypes.int4), "c": np.array([1 + 2j], np.complex64),
            "s": np.float16(3), "n": 5}


def test_headers_of_a_saved_checkpoint_match(tmp_path) -> None:
    keepax.save(tmp_path / "ckpt", _sharded_tree())
    assert _header_problems(tmp_path / "ckpt") == []
    keepax.save(tmp_path / "root", np.ones((3, 2), np.int8))
    assert _header_problems(tmp_path / "root") == []


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h.__setitem__("['x']", h.pop("['w']")), r"tensor \['w'\] is null"),
        (lambda h: h["['w']"].__setitem__("dtype", "I32"), r"tensor \['w'\] is"),
        (lambda h: h["['w']"].__setitem__("shape", [6, 4]), r"tensor \['w'\] is"),
        (lambda h: h["['w']"]["data_offsets"].__setitem__(1, 95), r"tensor \['w'\] is"),
        (lambda h: h["__metadata__"].__setitem__("format", "other"), "__metadata__.format"),
        (lambda h: h["__metadata__"].__setitem__("format", 3), "__metadata__ is not an object"),
        (lambda h: (h["__metadata__"].pop("format_version"), h["__metadata__"].pop("file"),
                    h.__setitem__("x", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})),
         "not in the manifest"),
    ],
)
def test_damaged_header_is_reported(tmp_path, edit, match) -> None:
    keepax.save(tmp_path / "ckpt", {"w": np.arange(24, dtype=np.float32).reshape(4, 6),
                                    "pad": np.zeros(64, np.uint8)})
    (file,) = data_files(tmp_path / "ckpt")
    _edit_header(file, edit)
    problems = _header_problems(tmp_path / "ckpt")
    assert problems and any(re.search(match, p) for p in problems), problems
    assert all(p.startswith(str(tmp_path / "ckpt")) and "p00000-000.safetensors" in p
               for p in problems)
    # keepax itself reads through the manifest: the checkpoint still restores.
    assert np.array_equal(keepax.restore(tmp_path / "ckpt")["w"], np.arange(24).reshape(4, 6))


def test_unparsable_header_is_reported(tmp_path) -> None:
    keepax.save(tmp_path / "ckpt", {"w": np.arange(4, dtype=np.float32)})
    (file,) = data_files(tmp_path / "ckpt")
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"\xff")
    (problem,) = _header_problems(tmp_path / "ckpt")
    assert "not valid JSON" in problem
