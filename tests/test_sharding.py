"""Sharded arrays in one process: unique shards written once, restore onto any sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import keepax
from keepax._src.format import boxes as shd


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def global_array(shape, sharding, dtype=np.float32) -> jax.Array:
    values = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    return jax.make_array_from_callback(shape, sharding, lambda idx: values[idx]), values


def test_box_helpers() -> None:
    assert shd.box_from_index((slice(2, 4), slice(None)), (8, 3)) == ((2, 0), (2, 3))
    assert shd.intersect(((0, 0), (4, 4)), ((2, 3), (4, 4))) == ((2, 3), (2, 1))
    assert shd.intersect(((0,), (2,)), ((2,), (2,))) is None
    assert shd.local_slices(((2, 3), (2, 1)), ((2, 0), (4, 4))) == (slice(0, 2), slice(3, 4))
    boxes = list(shd.split_rows(((4, 0), (10, 3)), 4, 40))
    assert boxes == [((4, 0), (3, 3)), ((7, 0), (3, 3)), ((10, 0), (3, 3)), ((13, 0), (1, 3))]
    assert list(shd.split_rows(((0,), (1,)), 4, 1)) == [((0,), (1,))]
    a = shd.aligned_empty((3, 5), np.float32)
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous


@pytest.mark.parametrize(
    "spec",
    [P("data", "model"), P("data", None), P(None, "model"), P(), P(("data", "model"))],
    ids=str,
)
def test_each_unique_shard_is_written_once(tmp_path, spec) -> None:
    m = mesh((4, 2), ("data", "model"))
    arr, values = global_array((16, 8), NamedSharding(m, spec))
    keepax.save(tmp_path / "ckpt", {"w": arr})
    info = keepax.inspect(tmp_path / "ckpt")
    (leaf,) = info.leaves
    unique = {shd.box_from_index(s.index, arr.shape) for s in arr.addressable_shards}
    assert leaf.chunks == len(unique)
    # Every byte stored exactly once: data files hold the array once, replicas skipped.
    assert leaf.nbytes == values.nbytes
    assert sum(n for _, n in info.files) < values.nbytes + 4096
    assert leaf.sharding["mesh"] == {"data": 4, "model": 2}
    np.testing.assert_array_equal(keepax.restore(tmp_path / "ckpt")["w"], values)


TARGETS = {
    "same": lambda: NamedSharding(mesh((4, 2), ("data", "model")), P("data", "model")),
    "other_mesh": lambda: NamedSharding(mesh((2, 4), ("a", "b")), P("b", "a")),
    "uneven_rows": lambda: NamedSharding(mesh((8,), ("x",)), P(None, "x")),
    "replicated": lambda: NamedSharding(mesh((8,), ("x",)), P()),
    "single_device": lambda: SingleDeviceSharding(jax.devices()[3]),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_restore_onto_any_sharding(tmp_path, target) -> None:
    source = NamedSharding(mesh((4, 2), ("data", "model")), P("data", "model"))
    arr, values = global_array((16, 8), source)
    keepax.save(tmp_path / "ckpt", {"w": arr, "k": jax.random.key(1)})
    sharding = TARGETS[target]()
    like = {
        "w": jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=sharding),
        "k": jax.random.key(0),
    }
    stats = keepax.RestoreStats()
    back = keepax.restore(tmp_path / "ckpt", like=like, stats=stats)
    assert back["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(back["w"]), values)
    for shard in back["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index])
    # Each saved chunk is read at most once however many target shards overlap it.
    assert stats.bytes_read <= values.nbytes + 8


def test_restore_reads_only_chunks_overlapping_the_needed_boxes(tmp_path) -> None:
    m = mesh((8,), ("x",))
    arr, values = global_array((64, 4), NamedSharding(m, P("x")))
    keepax.save(tmp_path / "ckpt", arr)
    # A target that lives on 2 devices only: the first half of rows on device 0 and 1.
    sub = NamedSharding(mesh((2,), ("x",)), P("x"))
    stats = keepax.RestoreStats()
    like = jax.ShapeDtypeStruct((64, 4), np.float32, sharding=sub)
    back = keepax.restore(tmp_path / "ckpt", like=like, stats=stats)
    np.testing.assert_array_equal(np.asarray(back), values)
    assert stats.chunks_read == 8 and stats.bytes_read == values.nbytes


def test_sharded_typed_keys_and_bfloat16(tmp_path) -> None:
    m = mesh((4,), ("x",))
    keys = jax.device_put(jax.random.split(jax.random.key(0), 8), NamedSharding(m, P("x")))
    w = jax.device_put(
        jnp.arange(32, dtype=jnp.bfloat16).reshape(8, 4), NamedSharding(m, P(None, "x"))
    )
    tree = {"keys": keys, "w": w}
    keepax.save(tmp_path / "ckpt", tree)
    back = keepax.restore(tmp_path / "ckpt", like=tree)
    assert back["keys"].sharding.is_equivalent_to(keys.sharding, keys.ndim)
    np.testing.assert_array_equal(jax.random.key_data(back["keys"]), jax.random.key_data(keys))
    assert back["w"].sharding == w.sharding
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(w))


def test_restored_arrays_work_in_jit(tmp_path) -> None:
    s = NamedSharding(mesh((4, 2), ("data", "model")), P("data", "model"))
    arr, values = global_array((16, 8), s)
    keepax.save(tmp_path / "ckpt", arr)
    back = keepax.restore(tmp_path / "ckpt", like=arr)
    total = jax.jit(lambda a: (a * 2).sum())(back)
    assert float(total) == float(values.sum() * 2)
