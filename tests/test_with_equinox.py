"""equinox users: a model saved as ``eqx.filter(model, eqx.is_array)`` (with ``eqx.nn.State``
for BatchNorm) restores into a fresh model's arrays, recombines, and continues bit-exactly;
saving a whole model with non-array leaves says how to filter it."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import keepax


class Model(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(3, 8, key=k1)
        self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="ema")
        self.out = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        x, state = self.norm(jax.nn.relu(self.linear(x)), state)
        return self.out(x), state


def _fresh() -> tuple[Model, eqx.nn.State]:
    return eqx.nn.make_with_state(Model)(jax.random.key(0))


OPT = optax.adam(1e-2)


@eqx.filter_jit
def _step(model: Model, state: eqx.nn.State, opt_state: Any, i: int) -> Any:
    x = jax.random.normal(jax.random.key(i), (4, 3))

    def loss(m: Model) -> tuple[jax.Array, eqx.nn.State]:
        out, new = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )
        return jnp.mean(out**2), new

    (_, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    updates, opt_state = OPT.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state


def _train(model: Model, state: eqx.nn.State, opt_state: Any, steps: range) -> Any:
    for i in steps:
        model, state, opt_state = _step(model, state, opt_state, i)
    return model, state, opt_state


def test_filtered_model_and_state_resume_bit_exactly(tmp_path) -> None:
    model, state = _fresh()
    reference = _train(model, state, OPT.init(eqx.filter(model, eqx.is_array)), range(4))

    model, state = _fresh()
    model, state, opt_state = _train(
        model, state, OPT.init(eqx.filter(model, eqx.is_array)), range(2)
    )
    keepax.save(tmp_path / "ckpt", {
        "model": eqx.filter(model, eqx.is_array), "state": state, "opt": opt_state,
    })

    fresh_model, fresh_state = _fresh()
    params, static = eqx.partition(fresh_model, eqx.is_array)
    like = {"model": params, "state": fresh_state, "opt": OPT.init(params)}
    back = keepax.restore(tmp_path / "ckpt", like=like)
    model = eqx.combine(back["model"], static)
    resumed = _train(model, back["state"], back["opt"], range(2, 4))
    for a, b in zip(jax.tree.leaves(eqx.filter(resumed, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(reference, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_whole_model_with_functions_says_how_to_filter(tmp_path) -> None:
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))  # holds activation functions
    with pytest.raises(keepax.errors.UnsupportedLeafError, match=r"eqx\.filter"):
        keepax.save(tmp_path / "ckpt", model)
