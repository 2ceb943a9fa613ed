"""Casting the floating-point leaves of a tree before it is saved (``dtype=`` on save).

A save with ``dtype=jnp.bfloat16`` stores every floating-point array (``jax.Array``,
``np.ndarray``, NumPy floating scalars) as bfloat16; integers, booleans, complex numbers, PRNG
keys, Python numbers and every other leaf are stored as they are. The cast happens in the
caller's thread, before staging: a ``jax.Array`` is cast on its devices (keeping its
sharding, each process casting only its own shards), a NumPy array on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keepax.errors import KeepaxError

__all__ = ["cast_floating", "floating_dtype"]


def floating_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy floating-point dtype (bfloat16 and float8 included).

    Raises:
      KeepaxError: ``dtype`` is not a dtype, or not a floating-point one (integers are
        never cast on save).
    """
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise KeepaxError(
            f"dtype={dtype!r} is not a dtype; pass a floating-point dtype such as jnp.bfloat16"
        ) from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise KeepaxError(
            f"dtype={dtype!r} is not a floating-point dtype: a save casts only floating-point "
            "leaves, to a floating-point dtype such as jnp.bfloat16 (integers are kept as they "
            "are)"
        )
    return np.dtype(resolved)


def _cast_leaf(leaf: Any, dtype: np.dtype) -> Any:
    """``leaf`` cast to ``dtype`` if it is a floating-point JAX or NumPy array (or scalar)."""
    if (
        isinstance(leaf, jax.Array | np.ndarray | np.generic)
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.dtype != dtype
    ):
        return leaf.astype(dtype)
    return leaf


def cast_floating(tree: Any, dtype: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """A copy of ``tree`` with each floating-point array leaf cast to ``dtype``.

    The caller's tree is not changed; leaves that are not cast are the same objects.

    Args:
      tree: Any pytree.
      dtype: A floating-point dtype, e.g. ``jnp.bfloat16``; None returns ``tree`` itself.
      is_leaf: Passed to :func:`jax.tree_util.tree_map`: subtrees to keep whole and uncast
        (the manager's objects with ``get_state``/``set_state``).

    Returns:
      The cast tree.

    Raises:
      KeepaxError: ``dtype`` is not a floating-point dtype.

    Example:
      >>> out = cast_floating({"w": np.ones(2, np.float32), "n": np.int32(3)}, jnp.bfloat16)
      >>> str(out["w"].dtype), str(out["n"].dtype)
      ('bfloat16', 'int32')
    """
    if dtype is None:
        return tree
    target = floating_dtype(dtype)
    return jax.tree_util.tree_map(lambda leaf: _cast_leaf(leaf, target), tree, is_leaf=is_leaf)
