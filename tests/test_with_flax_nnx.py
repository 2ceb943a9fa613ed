"""flax.nnx users: ``nnx.split`` state (parameters, BatchNorm statistics, Rngs counters and an
``nnx.Optimizer``) saves, restores into a fresh model's state, ``nnx.update``s the model and
continues bit-exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import keepax


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(self.norm(nnx.relu(self.linear(x)))))


def _fresh() -> tuple[Net, nnx.Optimizer]:
    model = Net(nnx.Rngs(0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def _step(model: Net, optimizer: nnx.Optimizer, x: jax.Array) -> None:
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)


def _train(model: Net, optimizer: nnx.Optimizer, steps: range) -> None:
    for i in steps:
        _step(model, optimizer, jax.random.normal(jax.random.key(i), (4, 3)))


def _leaves(*nodes: object) -> list[np.ndarray]:
    out = []
    for leaf in jax.tree.leaves(nnx.state(nodes)):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def test_split_state_resumes_bit_exactly(tmp_path) -> None:
    reference, ref_opt = _fresh()
    _train(reference, ref_opt, range(4))

    model, optimizer = _fresh()
    _train(model, optimizer, range(2))
    keepax.save(tmp_path / "ckpt", {"model": nnx.state(model), "opt": nnx.state(optimizer)})

    model, optimizer = _fresh()
    like = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
    back = keepax.restore(tmp_path / "ckpt", like=like)
    nnx.update(model, back["model"])
    nnx.update(optimizer, back["opt"])
    _train(model, optimizer, range(2, 4))
    for a, b in zip(_leaves(model, optimizer), _leaves(reference, ref_opt)):
        np.testing.assert_array_equal(a, b)


def test_graphdef_and_state_round_trip_through_merge(tmp_path) -> None:
    model, _ = _fresh()
    graphdef, state = nnx.split(model)
    keepax.save(tmp_path / "ckpt", state)
    back = keepax.restore(tmp_path / "ckpt", like=nnx.split(Net(nnx.Rngs(5, dropout=6)))[1])
    merged = nnx.merge(graphdef, back)
    x = jnp.ones((2, 3))
    merged.eval()
    model.eval()
    np.testing.assert_array_equal(np.asarray(merged(x)), np.asarray(model(x)))
