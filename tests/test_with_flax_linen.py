"""flax.linen users: a TrainState (adamw, BatchNorm statistics, dropout RNG) saved by a
manager and resumed with ``restore_or_initialize(TrainState.create(...))`` continues training
bit-exactly."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import keepax


class Net(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(1)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: Any
    key: jax.Array


def _create() -> TrainState:
    net = Net()
    variables = net.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    return TrainState.create(
        apply_fn=net.apply, params=variables["params"], batch_stats=variables["batch_stats"],
        tx=optax.adamw(1e-2), key=jax.random.key(1),
    )


@jax.jit
def _step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    key, dropout = jax.random.split(state.key)

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            rngs={"dropout": dropout}, mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state.replace(key=key)


def _batch(i: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(i)
    return jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray(
        rng.normal(size=(4, 1)), jnp.float32
    )


def _assert_same(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_through_restore_or_initialize_is_bit_exact(tmp_path) -> None:
    reference = _create()
    for i in range(6):
        reference = _step(reference, *_batch(i))

    with keepax.CheckpointManager(tmp_path / "run", async_save=False) as mngr:
        state, step = mngr.restore_or_initialize(_create())
        assert step is None and int(state.step) == 0
        for i in range(3):
            state = _step(state, *_batch(i))
        mngr.save(3, state)

    with keepax.CheckpointManager(tmp_path / "run", async_save=False) as mngr:
        state, step = mngr.restore_or_initialize(_create())
    assert step == 3 and type(state) is TrainState and int(state.step) == 3
    for i in range(3, 6):
        state = _step(state, *_batch(i))
    _assert_same(state, reference)


def test_plain_restore_into_a_fresh_train_state(tmp_path) -> None:
    trained = _step(_create(), *_batch(0))
    keepax.save(tmp_path / "ckpt", trained)
    back = keepax.restore(tmp_path / "ckpt", like=_create())
    assert isinstance(back.step, int) and back.step == 1  # the like's kind, the saved value
    _assert_same(back.params, trained.params)
    _assert_same(back.opt_state, trained.opt_state)


def test_a_step_0_checkpoint_restores_into_a_trained_state(tmp_path) -> None:
    fresh = _create()
    keepax.save(tmp_path / "ckpt", fresh)
    trained = _step(_create(), *_batch(0))
    back = keepax.restore(tmp_path / "ckpt", like=trained)
    assert isinstance(back.step, jax.Array) and int(back.step) == 0
    assert back.step.dtype == trained.step.dtype
