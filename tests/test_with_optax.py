"""optax users: every common optimizer state saves, restores into ``opt.init(params)`` and
continues bit-exactly (adam, adamw, lbfgs with its linesearch, chain + clip, multi_transform
with masked states, inject_hyperparams, MultiSteps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import keepax


def _params() -> dict[str, Any]:
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 10, "b": jnp.ones(3)}


def _loss(p: dict[str, Any]) -> jax.Array:
    return jnp.sum((p["w"] @ jnp.ones(3) - 1.0) ** 2) + jnp.sum(p["b"] ** 2)


def _label(p: dict[str, Any]) -> dict[str, str]:
    return {"w": "train", "b": "frozen"}


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    "lbfgs": lambda: optax.lbfgs(),
    "chain_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "multi_transform": lambda: optax.multi_transform(
        {"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, _label
    ),
    "masked": lambda: optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
}


def _run(opt: optax.GradientTransformation, params: Any, state: Any, steps: int) -> Any:
    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        value, grads = jax.value_and_grad(_loss)(params)
        updates, state = opt.update(
            grads, state, params, value=value, grad=grads, value_fn=_loss
        )
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_resumes_bit_exactly(tmp_path, name: str) -> None:
    opt = OPTIMIZERS[name]()
    params = _params()
    reference = _run(opt, params, opt.init(params), 6)

    middle = _run(opt, params, opt.init(params), 3)
    keepax.save(tmp_path / "ckpt", {"params": middle[0], "opt_state": middle[1]})
    fresh = {"params": _params(), "opt_state": opt.init(_params())}
    back = keepax.restore(tmp_path / "ckpt", like=fresh)
    assert jax.tree.structure(back) == jax.tree.structure(fresh)
    resumed = _run(opt, back["params"], back["opt_state"], 3)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_optax_state_restores_into_its_own_description(tmp_path) -> None:
    opt = optax.adam(1e-2)
    keepax.save(tmp_path / "ckpt", {"opt_state": opt.init(_params())})
    plain = keepax.restore(tmp_path / "ckpt")
    assert keepax.restore(tmp_path / "ckpt", like=plain).keys() == plain.keys()
    info = keepax.inspect(tmp_path / "ckpt")
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
        info.tree,
        is_leaf=lambda x: isinstance(x, keepax.LeafInfo),
    )
    back = keepax.restore(tmp_path / "ckpt", like=abstract)
    np.testing.assert_array_equal(back["opt_state"][0]["count"], plain["opt_state"][0]["count"])
