"""A small save / inspect / verify / restore round trip (`make demo`).

Saves a train-state-like tree (parameters, an optax Adam state stand-in, a PRNG key, a step
counter and a note) to ``demo_out/ckpt``, shows it with the CLI, verifies every checksum and
restores it twice: as plain NumPy, and onto the original structure and devices.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import keepax


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo_out")
    out = os.path.normpath(out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    path = os.path.join(out, "ckpt")

    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    params = {
        "dense1": {"w": jax.random.normal(k1, (256, 512)), "b": jnp.zeros(512)},
        "dense2": {"w": jax.random.normal(k2, (512, 10), jnp.bfloat16), "b": jnp.zeros(10)},
    }
    state = {
        "params": params,
        "opt": {"mu": jax.tree.map(jnp.zeros_like, params), "count": np.int32(7)},
        "rng": key,
        "step": 1000,
        "note": "demo run",
    }
    result = keepax.save(path, state, metadata={"loss": 0.125, "run": "demo"})
    print(f"saved {result.bytes_written:,} bytes in {result.seconds * 1e3:.1f} ms to {path}\n")

    cli = [sys.executable, "-m", "keepax"]
    subprocess.run([*cli, "show", path], check=True)
    subprocess.run([*cli, "verify", path], check=True)

    plain = keepax.restore(path, select=["params"])
    print(f"\nselect=['params'] as NumPy: {sorted(plain['params'])}")
    back = keepax.restore(path, like=state)
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(jax.random.key_data(a) if a.dtype ==
                                                    key.dtype else a),
                                         np.asarray(jax.random.key_data(b) if b.dtype ==
                                                    key.dtype else b)))
        if hasattr(a, "dtype") else a == b,
        state,
        back,
    )
    assert all(jax.tree.leaves(same)), same
    print("restored onto the original structure: every leaf identical")


if __name__ == "__main__":
    main()
