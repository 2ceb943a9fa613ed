"""Round trips of save/restore/inspect over leaf types, dtypes, containers and backends."""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import struct

import keepax
from keepax import errors

Pair = collections.namedtuple("Pair", ["first", "second"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Registered:
    weights: jax.Array
    bias: jax.Array


@struct.dataclass
class FlaxState:
    params: dict
    step: int
    name: str = struct.field(pytree_node=False, default="flax")


ALL_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.int4, ml_dtypes.uint4,
    ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.float8_e3m4, ml_dtypes.float8_e4m3,
    ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn, ml_dtypes.float6_e2m3fn,
    ml_dtypes.float6_e3m2fn,
]


def random_bits(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Random bit patterns (NaN payloads and negative zeros included) of any dtype."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw = raw % 2
    if dtype.name in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn"):
        raw = raw % (4 if dtype.name.endswith("2") else 16)
    if dtype.name.startswith("float6"):
        raw = raw % 64
    return raw.view(dtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_bit_exactly(root: str, dtype) -> None:
    values = {
        "matrix": random_bits((5, 7), dtype),
        "scalar": random_bits((), dtype, seed=1),
        "empty": np.zeros((0, 3), dtype),
    }
    # JAX holds 64-bit types only with jax_enable_x64, and XLA's CPU backend has no float6.
    on_jax = jax.dtypes.canonicalize_dtype(dtype) == dtype and "float6" not in np.dtype(dtype).name
    jax_values = {k: jnp.asarray(v) for k, v in values.items()} if on_jax else {}
    keepax.save(f"{root}/ckpt", {"np": values, "jax": jax_values})
    plain = keepax.restore(f"{root}/ckpt")
    for k, v in values.items():
        assert same_bits(plain["np"][k], v)
        if on_jax:
            assert same_bits(plain["jax"][k], v)
    back = keepax.restore(f"{root}/ckpt", like={"np": values, "jax": jax_values})
    for k, v in values.items():
        assert isinstance(back["np"][k], np.ndarray)
        assert same_bits(back["np"][k], v)
        if on_jax:
            assert isinstance(back["jax"][k], jax.Array)
            assert same_bits(back["jax"][k], v)


def test_special_floats_and_python_values_are_bit_exact(root: str) -> None:
    nan_payload = np.array([0x7FF0000000000123], np.uint64).view(np.float64)[0]
    tree = {
        "neg_zero": -0.0,
        "nan": float(nan_payload),
        "inf": float("-inf"),
        "big_int": 2**100,
        "neg": -7,
        "flag": True,
        "c": complex(-0.0, float("nan")),
        "text": "héllo\u0000\U0001F600",
        "blob": b"\x00\xffbytes",
        "empty_blob": b"",
        "none": None,
        "np_scalar": np.float32(-0.0),
        "np_int": np.int64(-3),
        "arr_nan": np.array([np.nan, -np.nan, -0.0], np.float32),
    }
    keepax.save(f"{root}/ckpt", tree)
    back = keepax.restore(f"{root}/ckpt")
    assert np.array([back["nan"]]).view(np.uint64)[0] == 0x7FF0000000000123
    assert math.copysign(1.0, back["neg_zero"]) == -1.0
    assert back["inf"] == float("-inf")
    assert back["big_int"] == 2**100 and type(back["big_int"]) is int
    assert back["neg"] == -7 and back["flag"] is True
    assert math.copysign(1, back["c"].real) == -1 and math.isnan(back["c"].imag)
    assert back["text"] == tree["text"]
    assert back["blob"] == tree["blob"] and back["empty_blob"] == b""
    assert back["none"] is None
    assert isinstance(back["np_scalar"], np.float32)
    assert same_bits(back["np_scalar"], tree["np_scalar"])
    assert isinstance(back["np_int"], np.int64) and back["np_int"] == -3
    assert same_bits(back["arr_nan"], tree["arr_nan"])
    back_like = keepax.restore(f"{root}/ckpt", like=tree)
    assert jax.tree.structure(back_like) == jax.tree.structure(tree)


def test_containers_round_trip_with_like_and_plain(root: str) -> None:
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    tree = {
        "pair": Pair(np.arange(3), "x"),
        "registered": Registered(jnp.ones(2), jnp.zeros(2)),
        "flax": FlaxState(params={"k": jnp.arange(4.0)}, step=3),
        "optax": optax.adam(1e-3).init(params),
        "list": [1, [2, (3, None)], {}],
        "tuple": (),
        "int_keys": {3: "three", 1: "one"},
        "tuple_keys": {(1, "a"): 1.5},
        "nested": {"a": {"b": {"c": jnp.int32(4)}}},
    }
    keepax.save(f"{root}/ckpt", tree)
    back = keepax.restore(f"{root}/ckpt", like=tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        if isinstance(a, jax.Array | np.ndarray):
            assert same_bits(a, b)
        else:
            assert a == b
    assert back["flax"].name == "flax"

    plain = keepax.restore(f"{root}/ckpt")
    assert plain["pair"]["second"] == "x"
    assert list(plain["registered"]) == ["weights", "bias"]
    assert set(plain["flax"]) == {"params", "step"}
    assert plain["list"] == [1, [2, (3, None)], {}]
    assert plain["tuple"] == ()
    assert plain["int_keys"] == {1: "one", 3: "three"}
    assert plain["tuple_keys"] == {(1, "a"): 1.5}
    # optax's ScaleByAdamState is a namedtuple: its fields come back by name.
    assert set(plain["optax"][0]) == {"count", "mu", "nu"}


def test_non_contiguous_arrays(root: str) -> None:
    base = np.arange(4 * 6 * 5, dtype=np.float64).reshape(4, 6, 5)
    tree = {
        "strided": base[::2, 1::2],
        "fortran": np.asfortranarray(base),
        "transposed": base.transpose(2, 0, 1),
        "negative": base[::-1],
        "broadcast": np.broadcast_to(np.arange(3.0), (1000, 3)),
    }
    keepax.save(f"{root}/ckpt", tree)
    back = keepax.restore(f"{root}/ckpt")
    for k, v in tree.items():
        assert np.array_equal(back[k], v), k
        assert back[k].flags.c_contiguous


def test_prng_keys_typed_and_raw(root: str) -> None:
    typed = jax.random.key(42)
    typed_batch = jax.random.split(typed, 5)
    rbg = jax.random.key(1, impl="rbg")
    raw = jax.random.PRNGKey(7)
    tree = {"typed": typed, "batch": typed_batch, "rbg": rbg, "raw": raw}
    keepax.save(f"{root}/ckpt", tree)
    back = keepax.restore(f"{root}/ckpt", like=tree)
    for k in ("typed", "batch", "rbg"):
        assert back[k].dtype == tree[k].dtype
        assert same_bits(jax.random.key_data(back[k]), jax.random.key_data(tree[k]))
    assert back["raw"].dtype == jnp.uint32 and same_bits(back["raw"], raw)
    # The restored key generates the same numbers.
    assert same_bits(jax.random.normal(back["typed"], (3,)), jax.random.normal(typed, (3,)))
    plain = keepax.restore(f"{root}/ckpt")
    assert jax.dtypes.issubdtype(plain["typed"].dtype, jax.dtypes.prng_key)
    abstract = jax.eval_shape(lambda: tree)
    from_struct = keepax.restore(f"{root}/ckpt", like=abstract)
    assert same_bits(jax.random.key_data(from_struct["batch"]), jax.random.key_data(typed_batch))


def test_root_leaf_and_empty_tree(root: str) -> None:
    keepax.save(f"{root}/leaf", jnp.arange(3))
    assert same_bits(keepax.restore(f"{root}/leaf"), np.arange(3, dtype=np.int32))
    keepax.save(f"{root}/empty", {})
    assert keepax.restore(f"{root}/empty") == {}
    keepax.save(f"{root}/none", None)
    assert keepax.restore(f"{root}/none") is None


def test_like_with_shape_dtype_structs_and_default_device(root: str) -> None:
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": np.ones(2, np.int16)}
    keepax.save(f"{root}/ckpt", tree)
    like = {
        "a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jax.ShapeDtypeStruct((2,), np.int16)
    }
    back = keepax.restore(f"{root}/ckpt", like=like)
    assert isinstance(back["a"], jax.Array) and isinstance(back["b"], jax.Array)
    assert same_bits(back["a"], tree["a"])
    assert back["a"].devices() == {jax.devices()[0]}


def test_select_reads_only_the_selected_bytes(root: str) -> None:
    tree = {
        "params": {"w": np.ones((256, 256), np.float32), "b": np.zeros(256, np.float32)},
        "opt": {"mu": np.full((512, 512), 2.0, np.float32)},
        "step": 3,
    }
    keepax.save(f"{root}/ckpt", tree)
    stats = keepax.RestoreStats()
    got = keepax.restore(f"{root}/ckpt", select=["params"], stats=stats)
    assert set(got) == {"params"}
    assert np.array_equal(got["params"]["w"], tree["params"]["w"])
    assert stats.bytes_read == tree["params"]["w"].nbytes + tree["params"]["b"].nbytes
    deep = keepax.restore(f"{root}/ckpt", select="params/b")
    assert list(deep) == ["params"] and list(deep["params"]) == ["b"]
    both = keepax.restore(f"{root}/ckpt", select=[("opt", "mu"), "step"])
    assert set(both) == {"opt", "step"} and both["step"] == 3
    with_like = keepax.restore(f"{root}/ckpt", like={"params": tree["params"]}, select=["params"])
    assert np.array_equal(with_like["params"]["b"], tree["params"]["b"])
    with pytest.raises(errors.KeepaxError, match="matches no leaf.*opt.*params"):
        keepax.restore(f"{root}/ckpt", select=["nope"])


def test_partial_and_dtype_casting(root: str) -> None:
    tree = {"w": jnp.linspace(0, 1, 8, dtype=jnp.float32), "n": jnp.arange(3), "extra": np.ones(4)}
    keepax.save(f"{root}/ckpt", tree)
    stats = keepax.RestoreStats()
    got = keepax.restore(f"{root}/ckpt", like={"w": tree["w"]}, partial=True, stats=stats)
    assert list(got) == ["w"] and stats.bytes_read == tree["w"].nbytes
    with pytest.raises(errors.TreeMismatchError, match=r"\['extra'\].*partial=True"):
        keepax.restore(f"{root}/ckpt", like={"w": tree["w"], "n": tree["n"]})
    like_bf16 = {
        "w": jax.ShapeDtypeStruct((8,), jnp.bfloat16), "n": tree["n"], "extra": tree["extra"]
    }
    with pytest.raises(errors.TreeMismatchError, match="dtype='like'"):
        keepax.restore(f"{root}/ckpt", like=like_bf16)
    cast = keepax.restore(f"{root}/ckpt", like=like_bf16, dtype="like")
    assert cast["w"].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(cast["w"]), np.asarray(tree["w"]).astype(ml_dtypes.bfloat16))
    all_half = keepax.restore(f"{root}/ckpt", dtype=jnp.float16)
    assert all_half["w"].dtype == np.float16 and all_half["extra"].dtype == np.float16
    assert all_half["n"].dtype == np.int32  # integers are not cast


def test_inspect_reads_no_array_data(root: str) -> None:
    tree = {"w": np.ones((100, 10), np.float32), "s": "x", "k": jax.random.key(0)}
    keepax.save(f"{root}/ckpt", tree, metadata={"loss": 0.5, "tags": ["a"]})
    info = keepax.inspect(f"{root}/ckpt")
    assert info.metadata == {"loss": 0.5, "tags": ["a"]}
    assert info.format_version == "1.0"
    by_path = {leaf.path: leaf for leaf in info.leaves}
    assert by_path["['w']"].shape == (100, 10) and by_path["['w']"].nbytes == 4000
    assert by_path["['s']"].value == "x"
    assert by_path["['k']"].type == "prngkey"
    assert info.tree["w"].dtype == "float32"
    assert info.nbytes == 4000 + 8


def test_save_result_and_overwrite(root: str) -> None:
    result = keepax.save(f"{root}/ckpt", {"a": np.ones(10)})
    assert result.files == 1 and result.bytes_written > 80
    with pytest.raises(errors.CheckpointExistsError, match="overwrite=True"):
        keepax.save(f"{root}/ckpt", {"a": np.zeros(10)})
    keepax.save(f"{root}/ckpt", {"b": np.zeros(3)}, overwrite=True)
    assert list(keepax.restore(f"{root}/ckpt")) == ["b"]


def test_large_array_is_split_into_chunks_and_spread_over_files(root: str, monkeypatch) -> None:
    from keepax._src.format import datafiles as fmt

    monkeypatch.setattr(fmt, "CHUNK_BYTES", 4096)
    big = random_bits((300, 17), np.float32)  # 20,400 bytes -> 5 row-chunks of <= 4 KiB
    small = {f"v{i}": np.full(3, i, np.int8) for i in range(5)}
    keepax.save(f"{root}/ckpt", {"big": big, **small})
    info = keepax.inspect(f"{root}/ckpt")
    assert {leaf.path: leaf.chunks for leaf in info.leaves}["['big']"] == 5
    assert 1 < len(info.files) <= 4
    assert same_bits(keepax.restore(f"{root}/ckpt")["big"], big)
    # A restore of part of the array reads only the chunks it overlaps.
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    stats = keepax.RestoreStats()
    like = {"big": jax.ShapeDtypeStruct(big.shape, big.dtype, sharding=sharding), **small}
    got = keepax.restore(f"{root}/ckpt", like=like, stats=stats)
    assert same_bits(got["big"], big)


def test_weak_types_are_kept_so_jit_does_not_recompile(tmp_path) -> None:
    state = {"lr": jnp.asarray(0.1), "w": jnp.ones(3)}
    assert state["lr"].weak_type
    keepax.save(tmp_path / "ckpt", state)
    back = keepax.restore(tmp_path / "ckpt", like=state)
    assert back["lr"].weak_type and not back["w"].weak_type
    step = jax.jit(lambda s: s["w"] * s["lr"])
    step(state)
    step(back)
    assert step._cache_size() == 1


def test_file_urls(tmp_path) -> None:
    keepax.save(f"file://{tmp_path}/ckpt", {"a": np.arange(3)})
    assert (tmp_path / "ckpt" / "manifest.json").exists()
    assert list(keepax.restore(f"file://{tmp_path}/ckpt")["a"]) == [0, 1, 2]


def test_restore_timeout_bounds_a_stalled_storage(tmp_path, monkeypatch) -> None:
    from faulty_storage import Faults

    from keepax._src.io.local import LocalStorage

    path = str(tmp_path / "ckpt")
    w = np.arange(1000, dtype=np.float32)
    keepax.save(path, {"w": w, "step": 3})
    with pytest.raises(errors.KeepaxError, match="timeout"):
        keepax.restore(path, timeout=0)
    faults = Faults(hold_reads=True).install(monkeypatch, LocalStorage)  # data files stall
    try:
        with pytest.raises(errors.KeepaxError) as caught:
            keepax.restore(path, timeout=0.5)
        assert faults.entered.is_set()
        message = str(caught.value)
        assert "did not finish finding the data (chunk tables, file sizes) within " \
            "timeout=0.5 s" in message
        assert path in message and "Nothing was restored" in message
        # The manifest read first, then the handle's own deadline, which the stall also hits.
        with pytest.raises(errors.KeepaxError, match=r"finding the data .* timeout=0.2 s"):
            keepax.open(path).restore(timeout=0.2)
    finally:
        faults.release()
    monkeypatch.undo()
    out = keepax.restore(path, {"w": np.zeros_like(w), "step": 0}, timeout=60)
    np.testing.assert_array_equal(out["w"], w)
    assert out["step"] == 3
