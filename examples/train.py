"""Train a small MLP with optax, checkpointing with keepax; a killed run resumes exactly.

    python examples/train.py --dir demo_out/run --steps 300 --final demo_out/final.keepax

Everything the run depends on is in the checkpoint: the parameters, the optimizer state and
the position of the data iterator. So a run stopped with SIGTERM (or Ctrl-C) and started
again with the same command ends with the same parameters, bit for bit, as one that never
stopped. `examples/demo.py` (`make demo`) shows it.

- when to save: every 20 steps until step 100, then every 50, and always the last step;
- what to keep: the last 2 steps plus the 2 with the lowest eval loss;
- preemption: after SIGTERM/SIGINT the next `save` writes whatever the policy says, and
  `reached_preemption` tells the loop to stop.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import keepax
from keepax import policies

IN, HIDDEN, OUT = 8, 64, 1
BATCH = 32


def make_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n samples of a regression problem drawn from `seed`: y = a fixed nonlinear function of
    x (the same for every n) plus noise. Sets of different sizes get different samples."""
    rng = np.random.default_rng([seed, n])
    x = rng.normal(size=(n, IN)).astype(np.float32)
    w = np.random.default_rng(seed).normal(size=(IN, OUT)).astype(np.float32)
    y = np.sin(x @ w) + 0.1 * x[:, :1] ** 2 + 0.05 * rng.normal(size=(n, OUT))
    return x, y.astype(np.float32)


class Batches:
    """Shuffled mini-batches of (x, y), epoch after epoch.

    The order of each epoch is a pure function of (seed, epoch), so the position
    (epoch, index) is the iterator's whole state. keepax saves it with each step through
    `get_state()` (JSON-like values, never pickle) and, on restore, calls `set_state()` on
    this very object.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.x, self.y, self.seed = x, y, seed
        self.set_state({"epoch": 0, "index": 0})

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.index + BATCH > len(self.x):  # start the next epoch
            self.set_state({"epoch": self.epoch + 1, "index": 0})
        rows = self.order[self.index : self.index + BATCH]
        self.index += BATCH
        return self.x[rows], self.y[rows]


@jax.jit
def init_params(seed: int) -> dict[str, dict[str, jax.Array]]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)

    def dense(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
        return {"w": jax.random.normal(key, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}

    return {"l1": dense(k1, IN, HIDDEN), "l2": dense(k2, HIDDEN, HIDDEN),
            "l3": dense(k3, HIDDEN, OUT)}


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of a two-hidden-layer tanh MLP."""
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    h = jnp.tanh(h @ params["l2"]["w"] + params["l2"]["b"])
    return jnp.mean((h @ params["l3"]["w"] + params["l3"]["b"] - y) ** 2)


optimizer = optax.adam(3e-3)


@jax.jit
def train_step(params: dict, opt_state: optax.OptState, x: jax.Array, y: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


eval_loss = jax.jit(loss_fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (resumes from it)")
    parser.add_argument("--steps", type=int, default=300, help="train steps 0 .. steps-1")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the init")
    parser.add_argument("--step-delay", type=float, default=0.0,
                        help="sleep this many seconds per step (to have time to kill the run)")
    parser.add_argument("--final", help="write the final params to this file (keepax.save_file)")
    args = parser.parse_args()

    # A small training set (it overfits a little: the best eval loss is not the last one)
    # and a held-out set for the eval loss that decides which checkpoints are "best".
    train, heldout = Batches(*make_data(args.seed, 256), args.seed), make_data(args.seed, 512)
    params = init_params(args.seed)
    init = {"params": params, "opt_state": optimizer.init(params), "data": train}

    with keepax.CheckpointManager(
        args.dir,
        save_policy=policies.Stages.parse("every 20 until 100, then every 50"),
        keep=[policies.KeepLast(2), policies.KeepBest(2, "eval_loss", mode="min")],
        preemption=True,  # SIGTERM/SIGINT: the next save saves; then we stop (below)
    ) as mngr:
        # The latest step if there is one (params, optimizer state, and `train`'s position
        # set in place), else `init` as it is.
        state, step = mngr.restore_or_initialize(init)
        start = 0 if step is None else step + 1
        print(f"resumed from step {step}" if step is not None else "starting from scratch")

        for step in range(start, args.steps):
            x, y = next(state["data"])
            state["params"], state["opt_state"], loss = train_step(
                state["params"], state["opt_state"], x, y)
            time.sleep(args.step_delay)

            last = step == args.steps - 1
            if mngr.should_save(step) or last:  # evaluate only when a checkpoint is due
                metrics = {"eval_loss": float(eval_loss(state["params"], *heldout))}
                if mngr.save(step, state, metrics=metrics, force=last):
                    print(f"step {step:4d}  train loss {float(loss):.4f}  "
                          f"eval loss {metrics['eval_loss']:.4f}  saved")
            if mngr.reached_preemption(step):  # a signal arrived and step was just saved
                print(f"preempted: saved step {step}, exiting; run again to resume")
                return

    if args.final:
        keepax.save_file(args.final, state["params"], overwrite=True)
        print(f"final params written to {args.final}")


if __name__ == "__main__":
    main()
