"""Restoring into the trees users bring: scalars vs 0-d arrays, container kinds, dtype casts,
per-leaf transforms, memory kinds, template-free shardings and trusted types, and selections
that return exactly what was selected."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import keepax
from keepax.errors import KeepaxError, TreeMismatchError


class Pair(NamedTuple):
    x: np.ndarray
    y: int


@dataclasses.dataclass
class Box:
    w: np.ndarray
    n: int


jax.tree_util.register_dataclass(Box, data_fields=["w", "n"], meta_fields=[])


def test_python_scalars_and_0d_arrays_are_interchangeable(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"step": jnp.asarray(5, jnp.int32), "lr": np.float32(0.25)})
    back = keepax.restore(tmp_path / "a", like={"step": 0, "lr": 0.0})
    assert back == {"step": 5, "lr": 0.25}
    assert type(back["step"]) is int and type(back["lr"]) is float

    keepax.save(tmp_path / "b", {"step": 7, "flag": True})
    like = {"step": jnp.zeros((), jnp.int32), "flag": np.bool_(False)}
    back = keepax.restore(tmp_path / "b", like=like)
    assert isinstance(back["step"], jax.Array) and back["step"].dtype == jnp.int32
    assert int(back["step"]) == 7 and back["flag"] is np.True_


def test_a_value_that_cannot_be_represented_is_an_error_naming_the_leaf(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"big": 2**40, "half": np.float32(0.5)})
    with pytest.raises(TreeMismatchError) as e:
        keepax.restore(tmp_path / "a", like={"big": jnp.zeros((), jnp.int32), "half": 0.0})
    assert e.value.leaf == "['big']"
    with pytest.raises(TreeMismatchError, match="cannot hold exactly") as e:
        keepax.restore(tmp_path / "a", like={"big": 0, "half": 0})
    assert "['half']" in str(e.value) and "an int" in str(e.value)


def test_container_kinds_with_the_same_fields_match_both_ways(tmp_path) -> None:
    tree = {"p": Pair(np.arange(3.0), 4), "b": Box(np.ones(2), 9)}
    keepax.save(tmp_path / "a", tree)
    as_dicts = keepax.restore(tmp_path / "a")
    assert type(as_dicts["p"]) is dict and as_dicts["b"]["n"] == 9
    back = keepax.restore(tmp_path / "a", like=as_dicts)
    assert isinstance(back["p"], dict) and back["p"]["y"] == 4
    keepax.save(tmp_path / "d", as_dicts)
    again = keepax.restore(tmp_path / "d", like=tree)
    assert type(again["p"]) is Pair and type(again["b"]) is Box
    np.testing.assert_array_equal(again["b"].w, np.ones(2))


def test_inspect_tree_is_a_like_for_its_own_checkpoint(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"p": Pair(np.arange(3.0), 4)})
    info = keepax.inspect(tmp_path / "a")
    like = jax.tree.map(
        lambda leaf: leaf.value if leaf.shape is None
        else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
        info.tree, is_leaf=lambda x: isinstance(x, keepax.LeafInfo),
    )
    back = keepax.restore(tmp_path / "a", like=like)
    np.testing.assert_array_equal(back["p"]["x"], np.arange(3.0))


def test_dtype_casts_floats_even_when_like_says_otherwise(tmp_path) -> None:
    mesh = jax.make_mesh((2,), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    keepax.save(tmp_path / "a", {"w": jnp.arange(4.0), "n": jnp.arange(4)})
    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding),
            "n": jax.ShapeDtypeStruct((4,), jnp.int32)}
    back = keepax.restore(tmp_path / "a", like=like, dtype=jnp.bfloat16)
    assert back["w"].dtype == jnp.bfloat16 and back["w"].sharding == sharding
    assert back["n"].dtype == jnp.int32  # integers are never cast unless asked
    like16 = {"w": jax.ShapeDtypeStruct((4,), jnp.float16), "n": jax.ShapeDtypeStruct((4,),
                                                                                       jnp.int16)}
    cast = keepax.restore(tmp_path / "a", like=like16, dtype="like")
    assert cast["w"].dtype == jnp.float16 and cast["n"].dtype == jnp.int16
    with pytest.raises(TreeMismatchError, match="dtype='like'"):
        keepax.restore(tmp_path / "a", like=like16)


def test_transform_applies_to_each_leaf_as_it_arrives(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"w": np.arange(4.0), "s": "name"})
    seen = []

    def halve(path: str, value: object) -> object:
        seen.append(path)
        return value / 2 if isinstance(value, np.ndarray) else value

    back = keepax.restore(tmp_path / "a", transform=halve)
    np.testing.assert_array_equal(back["w"], np.arange(4.0) / 2)
    assert sorted(seen) == ["['s']", "['w']"]


@pytest.mark.parametrize("kind", ["pinned_host", "unpinned_host", "device"])
def test_memory_kinds_single_and_multi_device(tmp_path, kind: str) -> None:
    keepax.save(tmp_path / "a", {"x": jnp.arange(16.0).reshape(4, 4)})
    mesh = jax.make_mesh((4,), ("x",))
    for sharding in (NamedSharding(mesh, P("x"), memory_kind=kind),
                     jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)):
        like = {"x": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding)}
        back = keepax.restore(tmp_path / "a", like=like)
        assert back["x"].sharding.memory_kind == kind
        np.testing.assert_array_equal(np.asarray(back["x"]), np.arange(16.0).reshape(4, 4))


def test_template_free_restore_onto_a_mesh_from_rules(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"params": {"dense": {"kernel": np.ones((4, 8)),
                                                       "bias": np.zeros(8)}}, "step": 3})
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    rules = [(r"kernel$", NamedSharding(mesh, P(None, "model"))),
             (r"bias$", NamedSharding(mesh, P()))]
    back = keepax.restore(tmp_path / "a", shardings=rules)
    kernel = back["params"]["dense"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding.spec == P(None, "model")
    assert back["step"] == 3
    seen = {}

    def by_function(name: str, info: keepax.LeafInfo) -> NamedSharding | None:
        seen[name] = info.shape
        return NamedSharding(mesh, P()) if name.endswith("bias") else None

    back = keepax.restore(tmp_path / "a", shardings=by_function)
    assert isinstance(back["params"]["dense"]["bias"], jax.Array)
    assert isinstance(back["params"]["dense"]["kernel"], np.ndarray)
    assert seen == {"params/dense/bias": (8,), "params/dense/kernel": (4, 8)}
    with pytest.raises(KeepaxError, match="does not fit"):
        keepax.restore(tmp_path / "a", shardings=[("kernel", NamedSharding(mesh, P("data",
                                                                                   "model",
                                                                                   None)))])


def test_trusted_types_rebuild_containers_without_a_template(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"p": Pair(np.arange(3.0), 4), "b": Box(np.ones(2), 9)})
    back = keepax.restore(tmp_path / "a", types=[Pair, Box])
    assert type(back["p"]) is Pair and back["p"].y == 4
    assert type(back["b"]) is Box and back["b"].n == 9
    only_pair = keepax.restore(tmp_path / "a", types=[Pair])
    assert type(only_pair["b"]) is dict
    with pytest.raises(KeepaxError, match="namedtuple and dataclass"):
        keepax.restore(tmp_path / "a", types=[dict])


def test_select_returns_exactly_what_was_selected(tmp_path) -> None:
    keepax.save(tmp_path / "a", {"a": 1, "b": None, "c": {}, "d": [None], "e": [10, 20, 30],
                                 "f": (), "g": {"h": None, "i": 5}})
    assert keepax.restore(tmp_path / "a", select=["a"]) == {"a": 1}
    assert keepax.restore(tmp_path / "a", select=["e/1"]) == {"e": {1: 20}}
    assert keepax.restore(tmp_path / "a", select=["g"]) == {"g": {"h": None, "i": 5}}
    assert keepax.restore(tmp_path / "a", select=["e"]) == {"e": [10, 20, 30]}
    assert keepax.load_file is not None


class _Cursor:
    """A data iterator with get_state()/set_state(), as grain's and CLU's are."""

    def __init__(self) -> None:
        self.position = 0

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def test_plain_save_and_restore_take_objects_with_get_state(tmp_path) -> None:
    cursor = _Cursor()
    cursor.position = 17
    keepax.save(tmp_path / "a", {"w": np.ones(3), "data": cursor})
    assert keepax.restore(tmp_path / "a")["data"] == {"position": 17}
    fresh = _Cursor()
    back = keepax.restore(tmp_path / "a", like={"w": np.zeros(3), "data": fresh})
    assert back["data"] is fresh and fresh.position == 17
    np.testing.assert_array_equal(back["w"], np.ones(3))
    with pytest.raises(TreeMismatchError, match="not in like"):
        keepax.restore(tmp_path / "a", like={"data": _Cursor()})


def test_save_casts_floating_point_leaves_when_asked(tmp_path) -> None:
    tree = {"w": jnp.arange(4.0), "h": np.ones(2, np.float64), "n": jnp.arange(3),
            "data": _Cursor()}
    keepax.save(tmp_path / "a", tree, dtype=jnp.bfloat16)
    info = {leaf.path: leaf.dtype for leaf in keepax.inspect(tmp_path / "a").leaves}
    assert info["['w']"] == "bfloat16" and info["['h']"] == "bfloat16"
    assert info["['n']"] == "int32" and tree["w"].dtype == jnp.float32  # caller's tree intact
    keepax.save_async(tmp_path / "b", {"w": jnp.ones(2)}, dtype=jnp.float16).wait()
    assert keepax.inspect(tmp_path / "b").leaves[0].dtype == "float16"
    with pytest.raises(KeepaxError, match="floating"):
        keepax.save(tmp_path / "c", tree, dtype=jnp.int32)


@pytest.mark.parametrize("select", [None, "a", ["b"]])
def test_restored_arrays_are_freed_without_the_cyclic_collector(tmp_path, select) -> None:
    """Dropping a restored tree frees its arrays at once (no reference cycle holds them), and
    a save keeps no reference to the tree it saved."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    state = {"a": np.arange(10.0), "b": {"c": np.ones(3)}, "v": 3}
    saved = weakref.ref(state["b"]["c"])
    gc.collect()
    gc.disable()
    try:
        keepax.save(tmp_path / "a", state)
        del state
        assert saved() is None
        out = keepax.restore(tmp_path / "a", select=select)
        arrays = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, np.ndarray)]
        refs = [weakref.ref(x) for x in arrays]
        del out, arrays
        assert refs and all(r() is None for r in refs)
    finally:
        gc.enable()


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bfloat16 values from random bit patterns (NaN payloads, infinities, subnormals)."""
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(jnp.bfloat16)


def _mixed_state(rng: np.random.Generator) -> dict:
    """bf16 params and f32 Adam moments of a small transformer layer, plus a count."""
    shapes = {"wi": (64, 256), "wo": (256, 64), "q": (64, 64), "scale": (64,), "bias": (3,)}
    params = {k: _bf16_bits(rng, s) for k, s in shapes.items()}
    moments = {m: {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
               for m in ("mu", "nu")}
    return {"params": params, "opt_state": {**moments, "count": np.int32(5)}}


def test_mixed_bf16_f32_state_restores_bit_exact_from_aligned_independent_buffers(
    tmp_path,
) -> None:
    """Restored host buffers are carved from shared blocks: each is 64-byte aligned (JAX
    adopts it without a copy), none overlaps another, and every bit comes back."""
    state = _mixed_state(np.random.default_rng(0))
    keepax.save(tmp_path / "a", state)
    like = jax.tree.map(jnp.asarray, state)
    back = keepax.restore(tmp_path / "a", like=like)
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                      np.asarray(want).reshape(-1).view(np.uint8))
    plain = keepax.restore(tmp_path / "a")
    arrays = [x for x in jax.tree.leaves(plain) if isinstance(x, np.ndarray) and x.ndim]
    assert all(x.ctypes.data % 64 == 0 for x in arrays)
    for x in arrays:
        x.view(np.uint8)[...] = 0xAB
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True):
        if np.ndim(want):
            np.testing.assert_array_equal(got.view(np.uint8), 0xAB)  # no buffer overlaps
    again = keepax.restore(tmp_path / "a", like=like)
    np.testing.assert_array_equal(np.asarray(again["params"]["wi"]).view(np.uint16),
                                  state["params"]["wi"].view(np.uint16))


@pytest.mark.parametrize("spec", [P("x"), P(None, "x"), P()], ids=["rows", "columns", "replicated"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_a_sharding_on_local_devices_reads_each_byte_once_and_places_every_shard(
    tmp_path, spec, dtype,
) -> None:
    rng = np.random.default_rng(1)
    value = rng.standard_normal((16, 24), dtype=np.float32).astype(dtype)
    keepax.save(tmp_path / "a", {"w": value, "b": value[0]})
    mesh = jax.make_mesh((8,), ("x",))
    sharding = NamedSharding(mesh, spec)
    like = {"w": jax.ShapeDtypeStruct(value.shape, dtype, sharding=sharding),
            "b": jax.ShapeDtypeStruct(value[0].shape, dtype, sharding=NamedSharding(mesh, P()))}
    stats = keepax.RestoreStats()
    back = keepax.restore(tmp_path / "a", like=like, stats=stats)
    assert stats.bytes_read == value.nbytes + value[0].nbytes
    assert back["w"].sharding == sharding and back["w"].dtype == dtype
    assert back["w"].committed
    for shard in back["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    np.testing.assert_array_equal(np.asarray(back["b"]), value[0])
    doubled = jax.jit(lambda w: w * 2)(back["w"])  # a usable, correctly placed array
    np.testing.assert_array_equal(np.asarray(doubled), value * 2)


def test_placed_arrays_match_what_jax_device_put_makes(tmp_path) -> None:
    """The fast per-array placement gives what jax.device_put gives: the same values, dtype,
    sharding and committedness (uncommitted on the default device, committed on a device),
    also after a cast (float64 stored, float32 asked for)."""
    device = jax.devices()[3]
    state = {
        "plain": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "bf16": jnp.ones((4,), jnp.bfloat16),
        "on3": jax.device_put(jnp.arange(5, dtype=jnp.int32), device),
        "wide": np.linspace(0, 1, 3),  # float64
    }
    keepax.save(tmp_path / "a", state)
    like = {
        "plain": jnp.zeros((2, 3), jnp.float32),
        "bf16": jnp.zeros((4,), jnp.bfloat16),
        "on3": jax.ShapeDtypeStruct((5,), jnp.int32,
                                    sharding=jax.sharding.SingleDeviceSharding(device)),
        "wide": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    back = keepax.restore(tmp_path / "a", like=like, dtype="like")
    for name in ("plain", "bf16", "on3"):
        expected = jax.device_put(np.asarray(state[name]),
                                  device if name == "on3" else None)
        assert back[name].dtype == expected.dtype, name
        assert back[name].sharding == expected.sharding, name
        assert back[name].committed == expected.committed, name
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(state[name]))
    assert back["on3"].devices() == {device}
    assert back["wide"].dtype == jnp.float32 and not back["wide"].committed
    np.testing.assert_allclose(np.asarray(back["wide"]), state["wide"], rtol=1e-7)


def test_many_small_leaves_read_with_gaps_between_them(tmp_path) -> None:
    """Small chunks are read together straight into their arrays; a selection leaves gaps
    between the chunks read (read into scratch buffers), and every value lands in its leaf."""
    rng = np.random.default_rng(0)
    state = {f"g{g}": {f"w{i:03d}": rng.normal(size=(i % 7 + 1, 3)).astype(np.float32)
                       for i in range(300)} for g in range(2)}
    keepax.save(tmp_path / "a", state)
    back = keepax.restore(tmp_path / "a", like=jax.tree_util.tree_map(jnp.asarray, state))
    for g, leaves in state.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(np.asarray(back[g][name]), value)
    kept = [i for i in range(300) if i % 25 != 5]  # small gaps: read, into scratch buffers
    picked = keepax.restore(tmp_path / "a", select=[f"g1/w{i:03d}" for i in kept])
    assert sorted(picked["g1"]) == [f"w{i:03d}" for i in kept]
    for name, value in picked["g1"].items():
        np.testing.assert_array_equal(value, state["g1"][name])


def test_leaves_alike_in_shape_are_still_matched_and_placed_one_by_one(tmp_path) -> None:
    """Leaves of one shape and dtype share their checks and read plan only while their like
    leaves ask for the same: a weak-typed, a NumPy, a committed and an uncommitted like
    leaf of equal shapes each get what they ask for, and a mismatch among many equal
    leaves is reported for the leaf that differs."""
    device = jax.devices()[0]
    state = {f"w{i}": np.full((4,), i, np.float32) for i in range(6)}
    keepax.save(tmp_path / "a", state)
    like: dict[str, object] = {k: jnp.asarray(v) for k, v in state.items()}
    like["w1"] = jax.device_put(state["w1"], device)  # committed
    like["w2"] = state["w2"]  # NumPy
    like["w3"] = jax.ShapeDtypeStruct((4,), jnp.float32, weak_type=True)
    back = keepax.restore(tmp_path / "a", like=like)
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(back[k]), v)
    assert type(back["w2"]) is np.ndarray
    assert back["w1"].committed and not back["w0"].committed
    assert back["w3"].weak_type and not back["w4"].weak_type
    like["w5"] = jax.ShapeDtypeStruct((4,), jnp.float16)
    with pytest.raises(TreeMismatchError, match=r"\['w5'\]: dtype float32") as e:
        keepax.restore(tmp_path / "a", like=like)
    assert "(1 problem)" in str(e.value)
    numpy_back = keepax.restore(tmp_path / "a", dtype=jnp.float16)
    assert all(v.dtype == np.float16 for v in numpy_back.values())
