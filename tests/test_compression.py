"""Opt-in zstd compression: round trips, the stored format, resharding, damage, the options."""

from __future__ import annotations

import json
import sys

import crc32c
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import zstandard
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import keepax
from keepax._src.format import codecs, datafiles
from keepax.errors import CorruptCheckpointError, KeepaxError, PolicyError


def _state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f32": (rng.standard_normal((256, 64)) * 0.02).astype(np.float32),
        "bf16": rng.standard_normal(3000).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal(100).astype(ml_dtypes.float8_e4m3fn),
        "tokens": rng.integers(0, 50_000, 4096).astype(np.int32),
        "zeros": np.zeros((128, 128), np.float32),
        "noise": rng.integers(0, 256, 5000).astype(np.uint8),  # incompressible: stays raw
        "bool": rng.random(77) < 0.5,
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.float64(2.5),
        "jax": jnp.arange(1000, dtype=jnp.int32).reshape(10, 100),
        "py": [1, "two", None],
    }


def _chunks(path) -> dict[str, list[dict]]:
    doc = json.loads((path / "manifest.json").read_bytes())
    return {leaf["path"]: leaf.get("chunks", []) for leaf in doc["leaves"]}


def _assert_equal(got, want) -> None:
    for key, value in want.items():
        if isinstance(value, list):
            assert list(got[key]) == value
        else:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
            assert np.asarray(got[key]).dtype == np.asarray(value).dtype


@pytest.mark.parametrize("compression", ["zstd", ("zstd", 1), ("zstd", 19), ("zstd", -3)])
def test_round_trip_and_stored_format(tmp_path, compression) -> None:
    state = _state()
    path = tmp_path / "ckpt"
    result = keepax.save(str(path), state, compression=compression)
    _assert_equal(keepax.restore(str(path)), state)
    assert keepax.verify(str(path)) == []
    doc = json.loads((path / "manifest.json").read_bytes())
    assert doc["version"] == "1.3"  # the lowest that defines zstd-shuffle
    chunks = _chunks(path)
    assert chunks["['zeros']"][0]["codec"] == "zstd"  # shuffling zeros does not pay
    assert chunks["['tokens']"][0]["codec"] == "zstd-shuffle"
    assert chunks["['bool']"][0].get("codec", "raw") != "zstd-shuffle"  # 1-byte elements
    assert chunks["['zeros']"][0]["stored_nbytes"] < 128 * 128 * 4 // 50
    assert "codec" not in chunks["['noise']"][0]  # not smaller compressed: kept raw
    # CRC-32C over the stored bytes.
    data = (path / doc["files"][0]["name"]).read_bytes()
    z = chunks["['zeros']"][0]
    assert crc32c.crc32c(data[z["offset"] : z["offset"] + z["stored_nbytes"]]) == z["crc32c"]
    raw_size = sum(np.asarray(v).nbytes for v in state.values() if not isinstance(v, list))
    assert result.bytes_written < raw_size


def test_data_files_stay_valid_safetensors(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ckpt"
    state = {k: v for k, v in _state().items() if k in ("zeros", "noise", "tokens", "f32")}
    keepax.save(str(path), state, compression="zstd")
    doc = json.loads((path / "manifest.json").read_bytes())
    loaded = safetensors.load_file(str(path / doc["files"][0]["name"]))
    assert loaded["['zeros']"].dtype == np.uint8  # declared as its stored bytes
    np.testing.assert_array_equal(loaded["['noise']"], _state()["noise"])


def test_restore_onto_other_shardings_and_select(tmp_path) -> None:
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    big = jnp.zeros((64, 32), jnp.float32).at[::3].set(1.5)
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"a": big, "b": np.arange(10)}, compression="zstd")
    like = {"a": jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                      sharding=NamedSharding(mesh, PartitionSpec(None, "x"))),
            "b": np.zeros(10, np.int64)}
    out = keepax.restore(str(path), like)
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(big))
    assert out["a"].sharding == like["a"].sharding
    assert list(keepax.restore(str(path), select=["b"])) == ["b"]


def test_many_files_when_over_the_pack_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datafiles, "_PACK_BYTES", 64 << 10)
    state = {f"w{i}": np.full((128, 128), i, np.float32) for i in range(6)}
    path = tmp_path / "ckpt"
    keepax.save(str(path), state, compression="zstd")
    assert len(list((path / "data").iterdir())) == 6
    _assert_equal(keepax.restore(str(path)), state)
    assert keepax.verify(str(path)) == []


@pytest.mark.parametrize("value", ["lz4", ("zstd", 23), ("zstd", "3"), ("zstd", True), 3,
                                   ("zstd", 3, 1)])
def test_bad_compression_values(tmp_path, value) -> None:
    with pytest.raises(KeepaxError, match="compression must be"):
        keepax.save(str(tmp_path / "c"), {"a": np.zeros(3)}, compression=value)
    assert not (tmp_path / "c").exists()


def test_missing_zstandard_says_how_to_install(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"a": np.zeros(1000)}, compression="zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(KeepaxError, match=r"pip install 'keepax\[zstd\]'"):
        keepax.save(str(tmp_path / "other"), {"a": np.zeros(3)}, compression="zstd")
    with pytest.raises(KeepaxError, match="zstandard"):
        keepax.restore(str(path))
    keepax.save(str(tmp_path / "plain"), {"a": np.zeros(3)})  # no compression: not needed
    assert keepax.restore(str(tmp_path / "plain"))["a"].shape == (3,)


def _replace_stored(path, leaf: str, new: bytes) -> None:
    """Replaces the stored bytes of ``leaf``'s (only, last-in-file) chunk, re-signing all."""
    doc = json.loads((path / "manifest.json").read_bytes())
    chunk = next(x for x in doc["leaves"] if x["path"] == leaf)["chunks"][0]
    file = path / doc["files"][chunk["file"]]["name"]
    raw = file.read_bytes()
    assert chunk["offset"] + chunk["stored_nbytes"] == len(raw)
    file.write_bytes(raw[: chunk["offset"]] + new)
    chunk.update(stored_nbytes=len(new), crc32c=crc32c.crc32c(new))
    doc["files"][chunk["file"]]["nbytes"] = chunk["offset"] + len(new)
    manifest = json.dumps(doc).encode()
    (path / "manifest.json").write_bytes(manifest)
    marker = json.loads((path / "keepax.commit").read_bytes())
    marker.update(manifest_nbytes=len(manifest), manifest_crc32c=crc32c.crc32c(manifest))
    (path / "keepax.commit").write_text(json.dumps(marker))


@pytest.mark.parametrize(("n", "content_size"), [(4096 * 4 * 100, True), (4096 * 4 * 100, False),
                                                 (4096 * 4 + 1, False), (100, True), (0, True)])
def test_frames_of_another_size_are_refused(tmp_path, n, content_size) -> None:
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"z": np.zeros(4096, np.float32)}, compression="zstd")
    bomb = zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(n))
    _replace_stored(path, "['z']", bomb)
    with pytest.raises(CorruptCheckpointError, match="decompresses to") as info:
        keepax.restore(str(path))
    assert info.value.leaf == "['z']"


def test_garbage_with_a_matching_checksum_is_refused(tmp_path) -> None:
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"z": np.zeros(4096, np.float32)}, compression="zstd")
    _replace_stored(path, "['z']", b"not a zstd frame at all")
    with pytest.raises(CorruptCheckpointError, match="does not decompress") as info:
        keepax.restore(str(path))
    assert info.value.leaf == "['z']"


def test_damaged_stored_bytes_fail_the_checksum_and_verify(tmp_path) -> None:
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"z": np.zeros(4096, np.float32)}, compression="zstd")
    file = next((path / "data").iterdir())
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        keepax.restore(str(path))
    assert any("checksum mismatch" in p for p in keepax.verify(str(path)))


def test_save_async_and_manager(tmp_path) -> None:
    state = _state()
    handle = keepax.save_async(str(tmp_path / "async"), state, compression=("zstd", 5))
    handle.wait()
    assert _chunks(tmp_path / "async")["['zeros']"][0]["codec"] == "zstd"
    _assert_equal(keepax.restore(str(tmp_path / "async")), state)
    for incremental in (False, True):
        directory = tmp_path / f"run-{incremental}"
        with keepax.CheckpointManager(directory, compression="zstd",
                                      incremental=incremental) as mgr:
            mgr.save(1, state)
            mgr.save(2, {**state, "f32": state["f32"] + 1})
            mgr.wait_until_finished()
            _assert_equal(mgr.restore(2), {**state, "f32": state["f32"] + 1})
            _assert_equal(mgr.restore(1), state)
        step = next(p for p in directory.iterdir() if p.name.endswith("2"))
        assert _chunks(step)["['zeros']"][0]["codec"] == "zstd"
        assert keepax.verify(str(step)) == []


def test_manager_option_checked_and_in_the_config(tmp_path) -> None:
    with pytest.raises(PolicyError, match="compression must be"):
        keepax.CheckpointManager(tmp_path / "bad", compression="gzip")
    with keepax.CheckpointManager(tmp_path / "run", compression=("zstd", 7)) as mgr:
        config = mgr.to_config()
    assert config["compression"] == ["zstd", 7]
    with keepax.CheckpointManager.from_config(json.loads(json.dumps(config))) as again:
        assert again.to_config()["compression"] == ["zstd", 7]


def test_cp_and_export_of_a_compressed_checkpoint(tmp_path) -> None:
    from keepax.cli import main  # noqa: PLC0415

    state = {"z": np.zeros((300, 300), np.float32), "w": np.arange(5000.0)}
    keepax.save(str(tmp_path / "c"), state, compression="zstd")
    assert main(["cp", str(tmp_path / "c"), str(tmp_path / "c2")]) == 0
    assert keepax.verify(str(tmp_path / "c2")) == []
    _assert_equal(keepax.restore(str(tmp_path / "c2")), state)
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "e.npz"), "-f", "npz"]) == 0
    with np.load(tmp_path / "e.npz") as npz:
        assert float(sum(npz[k].sum() for k in npz.files)) == 12497500.0


def _big_state() -> dict:
    """Chunks past the sample size (so the codec is chosen from a sample), odd sizes too."""
    rng = np.random.default_rng(1)
    zero = np.zeros(300_001, np.float32)
    zero[rng.random(zero.size) < 0.05] = 1.0
    return {
        "f32": (rng.standard_normal((517, 257)) * 0.02).astype(np.float32),
        "bf16": (rng.standard_normal(300_003) * 0.02).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal(70_001),
        "c64": (rng.standard_normal(40_001) + 1j).astype(np.complex64),
        "tokens": rng.integers(0, 50_000, 131_075).astype(np.int32),
        "counter": np.arange(100_003, dtype=np.int64),
        "zero_heavy": zero,
        "noise": rng.integers(0, 2**32, 200_001, dtype=np.uint32),
        "f8": rng.standard_normal(300_001).astype(ml_dtypes.float8_e4m3fn),
    }


def test_codec_chosen_per_chunk_and_round_trips(tmp_path) -> None:
    state = _big_state()
    path = tmp_path / "ckpt"
    keepax.save(str(path), state, compression="zstd")
    _assert_equal(keepax.restore(str(path)), state)
    assert keepax.verify(str(path)) == []
    codecs = {k[2:-2]: v[0].get("codec", "raw") for k, v in _chunks(path).items()}
    assert codecs == {"f32": "zstd-shuffle", "bf16": "zstd-shuffle", "f64": "zstd-shuffle",
                      "c64": "zstd-shuffle", "tokens": "zstd-shuffle",
                      "counter": "zstd-shuffle", "zero_heavy": "zstd", "noise": "raw",
                      "f8": "zstd"}
    # Shuffling pays: smaller than plain zstd of the same bytes.
    for key in ("f32", "bf16", "tokens"):
        chunk = _chunks(path)[f"['{key}']"][0]
        plain = zstandard.ZstdCompressor(level=1).compress(np.ascontiguousarray(state[key]))
        assert chunk["stored_nbytes"] < 0.95 * len(plain), key


def _planes(stored: bytes, data: np.ndarray, itemsize: int) -> list[bytes]:
    """The stored planes of a zstd-shuffle chunk of ``data``, read by the rules of
    docs/FORMAT.md §5.4.2 (table of u32 sizes; a plane of its block's element count is raw,
    a shorter one a frame), checked against the planes of the documented shuffle."""
    blocks = np.split(data, range(codecs.SHUFFLE_ELEMENTS * itemsize, len(data),
                                  codecs.SHUFFLE_ELEMENTS * itemsize))
    expected = [plane.tobytes() for block in blocks for plane in block.reshape(-1, itemsize).T]
    sizes = np.frombuffer(stored[: 4 * len(expected)], "<u4")
    position, got = 4 * len(expected), []
    for size, plane in zip(sizes.tolist(), expected):
        piece = stored[position : position + size]
        raw = size == len(plane)
        got.append(piece if raw else zstandard.ZstdDecompressor().decompress(piece))
        assert raw or zstandard.frame_content_size(piece) == len(plane)
        position += size
    assert position == len(stored)
    assert got == expected
    return got


@pytest.mark.parametrize("itemsize", [2, 4, 8, 16])
@pytest.mark.parametrize("elements", [1, 3, codecs.SHUFFLE_ELEMENTS - 1,
                                      codecs.SHUFFLE_ELEMENTS, 2 * codecs.SHUFFLE_ELEMENTS + 5])
@pytest.mark.parametrize("threads", [0, 3])
def test_shuffle_codec_layout_is_the_documented_one(itemsize, elements, threads) -> None:
    """The stored bytes are a table of plane sizes, then each block of SHUFFLE_ELEMENTS
    elements as byte planes: byte k of every element of the block, for k = 0, 1, ..., each a
    frame or raw (docs/FORMAT.md §5.4.2); threads change nothing stored."""
    rng = np.random.default_rng(elements)
    data = rng.integers(0, 4, elements * itemsize).astype(np.uint8)  # compressible...
    data[1::itemsize] = rng.integers(0, 256, elements)  # ...but for a random plane
    stored = b"".join(codecs._shuffled(data, itemsize, 1, threads))
    assert stored == b"".join(codecs._shuffled(data, itemsize, 1))
    planes = _planes(stored, data, itemsize)
    sizes = np.frombuffer(stored[: 4 * len(planes)], "<u4")
    if elements >= 1000:  # random planes stay raw, the others are frames
        assert [size == len(plane) for size, plane in zip(sizes, planes)][:itemsize] == [
            k == 1 for k in range(itemsize)]
    out = bytearray(len(data))
    codecs.decode_into(memoryview(stored), "zstd-shuffle", memoryview(out), leaf="x",
                       where="w", itemsize=itemsize)
    assert bytes(out) == data.tobytes()


def _shuffled_with(plane: bytes, elements: int, itemsize: int, which: int = 0) -> bytes:
    """The stored bytes of a zstd-shuffle chunk of zeros whose plane ``which`` is ``plane``."""
    data = np.zeros(elements * itemsize, np.uint8)
    stored = b"".join(codecs._shuffled(data, itemsize, 1))
    planes = _planes(stored, data, itemsize)
    count = len(planes)
    sizes = np.frombuffer(stored[: 4 * count], "<u4").copy()
    position = 4 * count + int(sizes[:which].sum())
    body = stored[position : position + int(sizes[which])]
    sizes[which] = len(plane)
    rest = stored[4 * count :]
    start = position - 4 * count
    return sizes.astype("<u4").tobytes() + rest[:start] + plane + rest[start + len(body):]


@pytest.mark.parametrize(("plane", "match"), [
    ("bomb", "decompresses to more than"), ("bomb-unsized", "decompresses to more than"),
    ("short", "decompresses to 100 bytes"), ("short-unsized", "decompresses to 100 bytes"),
    ("garbage", "does not decompress"), ("table", "table of plane sizes"),
    ("long", "table of plane sizes"), ("cut", "shorter than its table"),
])
def test_damaged_shuffled_planes_are_refused(plane, match) -> None:
    """A plane frame of more or fewer bytes than its plane, garbage, or a table that does not
    add up, is damage naming the leaf; nothing is produced past the chunk."""
    elements, itemsize = 1000, 4
    sized = not plane.endswith("unsized")
    maker = zstandard.ZstdCompressor(write_content_size=sized)
    stored = {
        "bomb": lambda: _shuffled_with(maker.compress(bytes(10**6)), elements, itemsize, 2),
        "short": lambda: _shuffled_with(maker.compress(bytes(100)), elements, itemsize, 3),
        "garbage": lambda: _shuffled_with(b"not a frame", elements, itemsize, 1),
        "table": lambda: b"\0" * 16 + bytes(4000),
        "long": lambda: _shuffled_with(bytes(1000), elements, itemsize) + b"\0",
        "cut": lambda: b"\1\0\0",
    }[plane.split("-")[0]]()
    out = bytearray(elements * itemsize + 8)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        codecs.decode_into(memoryview(stored), "zstd-shuffle", memoryview(out)[:-8], leaf="x",
                           where="w", itemsize=itemsize)
    assert info.value.leaf == "x"
    assert out[-8:] == bytes(8)


def test_shuffled_non_contiguous_scalar_and_sharded_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(2)
    base = (rng.standard_normal((700, 600)) * 0.02).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))
    sharded = jax.device_put(jnp.asarray(base), NamedSharding(mesh, PartitionSpec("x", "y")))
    state = {"strided": base[::2, 1::3], "transposed": base.T, "scalar": np.float32(1.5),
             "sharded": sharded}
    path = tmp_path / "ckpt"
    keepax.save(str(path), state, compression="zstd")
    assert {c.get("codec") for c in _chunks(path)["['sharded']"]} == {"zstd-shuffle"}
    assert len(_chunks(path)["['sharded']"]) == 4
    _assert_equal(keepax.restore(str(path)), state)
    like = {**state, "sharded": jax.ShapeDtypeStruct(
        base.shape, jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x")))}
    out = keepax.restore(str(path), like)
    np.testing.assert_array_equal(np.asarray(out["sharded"]), base)
    assert out["sharded"].sharding == like["sharded"].sharding


def test_damaged_shuffled_chunk_fails_verify_and_restore(tmp_path) -> None:
    path = tmp_path / "ckpt"
    tokens = np.random.default_rng(3).integers(0, 50_000, 65_536).astype(np.int32)
    keepax.save(str(path), {"t": tokens}, compression="zstd")
    assert _chunks(path)["['t']"][0]["codec"] == "zstd-shuffle"
    file = next((path / "data").iterdir())
    raw = bytearray(file.read_bytes())
    raw[-100] ^= 0x10
    file.write_bytes(bytes(raw))
    assert any("checksum mismatch" in p for p in keepax.verify(str(path)))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        keepax.restore(str(path))
    # A re-signed plane frame one element short is refused, naming the leaf.
    short = zstandard.ZstdCompressor().compress(bytes(65_535))
    _replace_stored(path, "['t']", _shuffled_with(short, 65_536, 4, 3))
    with pytest.raises(CorruptCheckpointError, match="decompresses to") as info:
        keepax.restore(str(path))
    assert info.value.leaf == "['t']"


def test_old_unshuffled_files_still_restore_and_stay_1_2(tmp_path) -> None:
    """A save whose chunks all compress plain (or stay raw) writes format 1.2, as before; a
    1.2 checkpoint of zstd chunks restores; zstd-shuffle in a 1.2 manifest is damage."""
    path = tmp_path / "ckpt"
    state = {"zeros": np.zeros((512, 512), np.float32), "ones": np.ones(70_000, np.uint8)}
    keepax.save(str(path), state, compression="zstd")
    doc = json.loads((path / "manifest.json").read_bytes())
    assert doc["version"] == "1.2"
    assert {c[0]["codec"] for c in _chunks(path).values()} == {"zstd"}
    _assert_equal(keepax.restore(str(path)), state)
    doc["leaves"][0]["chunks"][0]["codec"] = "zstd-shuffle"
    manifest = json.dumps(doc).encode()
    (path / "manifest.json").write_bytes(manifest)
    marker = json.loads((path / "keepax.commit").read_bytes())
    marker.update(manifest_nbytes=len(manifest), manifest_crc32c=crc32c.crc32c(manifest))
    (path / "keepax.commit").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpointError, match="needs format 1.3"):
        keepax.restore(str(path))


def test_compression_threads_and_big_chunks(tmp_path, monkeypatch) -> None:
    """Chunks past _THREADED are compressed by several zstd threads into one frame each."""
    monkeypatch.setattr(datafiles, "_THREADED", 1 << 20)
    rng = np.random.default_rng(4)
    state = {"w": (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32),
             "z": np.zeros((1024, 1024), np.float32)}
    path = tmp_path / "ckpt"
    keepax.save(str(path), state, compression="zstd")
    assert [c[0]["codec"] for c in _chunks(path).values()] == ["zstd-shuffle", "zstd"]
    _assert_equal(keepax.restore(str(path)), state)
