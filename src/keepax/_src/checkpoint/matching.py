"""Matching a checkpoint's leaves against the caller's ``like`` tree.

A ``like`` leaf matches the stored leaf at the same key path, where a key path compares by
its entries' names: a namedtuple or dataclass field ``.x``, a dict key ``['x']`` and a custom
node's key ``x`` are the same entry, so a tree restores into any container kinds holding the
same fields (the trees ``restore()`` and ``inspect()`` hand out included). Python scalars and
0-d arrays are interchangeable: the result takes the ``like`` leaf's kind with the saved value,
exactly, or the mismatch is reported naming the leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keepax._src.checkpoint import per_process
from keepax._src.checkpoint.opening import Opened
from keepax._src.checkpoint.plan import is_key_array
from keepax._src.format import dtypes, tree
from keepax._src.format.manifest import ArrayLeaf, ValueLeaf
from keepax.errors import TreeMismatchError

__all__ = [
    "ARRAYISH", "VALUE_KINDS", "Target", "array_as_value", "final_dtype", "match_like",
    "resolve_cast", "value_as", "weaken",
]

ARRAYISH = ("jax", "numpy", "npscalar")
VALUE_KINDS = ("bool", "int", "float", "complex")

# Which stored dtype kinds (numpy ``dtype.kind``) a Python value of each kind holds exactly.
_EXACT_KINDS = {"bool": "b", "int": "biu", "float": "f", "complex": "fc"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What the caller wants a leaf restored as (from its ``like`` leaf)."""

    kind: str  # "jax", "numpy", "npscalar", "prngkey", "bytes", or a value type
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    sharding: jax.sharding.Sharding | None = None
    weak_type: bool = False
    committed: bool = True
    like: Any = None  # for "perprocess": the like of the marked value


def target_of(like_leaf: Any, made: dict[Any, Target] | None = None) -> Target | None:
    """The :class:`Target` a ``like`` leaf asks for, or None for an unsupported leaf.

    ``made``: the targets of earlier leaves of one restore, which equal ones share (a
    ``like`` of many arrays has few distinct shapes, dtypes and shardings)."""
    x = like_leaf
    if isinstance(x, per_process.PerProcess):
        return Target("perprocess", like=x.value)
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
        fields = (
            tuple(x.shape),
            x.dtype,
            getattr(x, "sharding", None),
            bool(getattr(x, "weak_type", False)),
            # An array made by jnp.asarray is "uncommitted"; jit treats the two differently
            # (it recompiles), so a restore reproduces it. No public API exposes the flag.
            bool(getattr(x, "_committed", True)),
        )
        target = made.get(fields) if made is not None else None
        if target is None:
            if is_key_array(x):
                target = Target("prngkey", fields[0], None, fields[2])
            else:
                target = Target("jax", fields[0], np.dtype(fields[1]), *fields[2:])
            if made is not None:
                made[fields] = target
        return target
    if isinstance(x, np.ndarray):
        return Target("numpy", tuple(x.shape), x.dtype)
    if isinstance(x, np.generic):
        return Target("npscalar", (), np.dtype(x.dtype))
    if isinstance(x, bytes):
        return Target("bytes")
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("complex", complex),
                        ("str", str)):
        if isinstance(x, types):
            return Target(kind)
    return None


def resolve_cast(dtype: Any) -> Any:
    """Normalises a restore's ``dtype=`` argument: None, ``"like"`` or a NumPy dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype == "like"):
        return dtype
    return np.dtype(dtypes.dtype_from_name(jnp.dtype(dtype).name))


def final_dtype(stored: np.dtype, target: Target | None, cast: Any) -> np.dtype:
    """The dtype a leaf is restored as."""
    if isinstance(cast, np.dtype):
        return cast if jnp.issubdtype(stored, jnp.floating) else stored
    if cast == "like" and target is not None and target.dtype is not None:
        return target.dtype
    return stored


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _check_value_leaf(leaf: ValueLeaf, target: Target) -> str | None:
    if target.kind == leaf.type or (leaf.type, target.kind) == ("int", "float"):
        return None  # an int into a float is converted when exact (checked when read)
    if leaf.type in VALUE_KINDS and target.kind in ARRAYISH and target.shape == ():
        return None  # a Python scalar into a 0-d array: converted (and checked) when read
    return f"{leaf.path}: checkpoint holds {_a(leaf.type)}, like {_a(target.kind)}"


def _check_array_leaf(leaf: ArrayLeaf, target: Target, cast: Any) -> str | None:
    stored = dtypes.dtype_from_name(leaf.dtype)
    if leaf.type in ARRAYISH and target.kind in VALUE_KINDS:
        if tuple(leaf.shape) != ():
            return (f"{leaf.path}: checkpoint holds an array of shape {tuple(leaf.shape)}, "
                    f"like {_a(target.kind)}")
        if stored.kind not in _EXACT_KINDS[target.kind]:
            return (f"{leaf.path}: checkpoint holds a {stored} scalar, which {_a(target.kind)} "
                    "cannot hold exactly; make that like leaf an array of the saved dtype")
        return None
    if leaf.type in ARRAYISH:
        if target.kind not in ARRAYISH:
            return f"{leaf.path}: checkpoint holds an array, like {_a(target.kind)}"
    elif leaf.type != target.kind:
        return f"{leaf.path}: checkpoint holds {leaf.type}, like {_a(target.kind)}"
    if leaf.type == "prngkey":
        key_shape = leaf.shape[: len(target.shape or ())]
        if tuple(key_shape) != target.shape:
            return f"{leaf.path}: key shape {key_shape} in checkpoint, {target.shape} in like"
        return None
    if target.shape is not None and tuple(leaf.shape) != target.shape:
        return f"{leaf.path}: shape {tuple(leaf.shape)} in checkpoint, {target.shape} in like"
    if target.dtype is not None:
        final = final_dtype(stored, target, cast)
        if final != target.dtype and not (
            isinstance(cast, np.dtype) and jnp.issubdtype(stored, jnp.floating)
        ):  # an explicit dtype= cast of a floating-point leaf wins over like's dtype
            hint = ("pass dtype='like' to cast to like's dtypes" if cast is None else
                    f"dtype={cast} casts floating-point leaves only; pass dtype='like'")
            return f"{leaf.path}: dtype {final} from checkpoint, {target.dtype} in like ({hint})"
    return None


def check_leaf(leaf: ArrayLeaf | ValueLeaf, target: Target, cast: Any) -> str | None:
    """Why a stored leaf cannot be restored as the target, or None."""
    if isinstance(leaf, ValueLeaf):
        return _check_value_leaf(leaf, target)
    return _check_array_leaf(leaf, target, cast)


def _names(path: tree.KeyPath) -> tuple[Any, ...]:
    """A key path by its entries' names: ``.x``, ``['x']`` and a node key ``x`` compare equal."""
    return tuple(map(tree.entry_name, path))


def match_like(
    opened: Opened, wanted: Sequence[int], like_leaves: Sequence[tuple[Any, Any]],
    partial: bool, cast: Any,
) -> tuple[dict[int, Target | None], list[int]]:
    """Pairs the ``like`` leaves with the wanted stored leaves; returns each stored leaf's
    target and, per ``like`` leaf, the index of the stored leaf it gets.

    Raises:
      TreeMismatchError: listing every leaf that does not match, with the fix when known.
    """
    leaves = opened.manifest.leaves
    key_paths = opened.key_paths
    # A like path equal to a stored key path (the same entry types: the common case) is found
    # without naming its entries; any other is looked up by its entries' names.
    stored_paths = [key_paths[i] for i in wanted]
    in_order = stored_paths == [p for p, _ in like_leaves]
    by_path = {} if in_order else dict(zip(stored_paths, wanted))
    by_name: dict[tuple[Any, ...], int] | None = None
    targets: dict[int, Target | None] = {}
    like_order: list[int] = []
    problems: list[str] = []
    made: dict[Any, Target] = {}
    fine: set[tuple[Any, ...]] = set()  # (type, shape, dtype, target) already checked
    for position, (like_path, like_leaf) in enumerate(like_leaves):
        # The same paths in the same order (the common case): the n-th like leaf is the
        # n-th wanted leaf.
        index = wanted[position] if in_order else by_path.get(like_path)
        if index is None:
            if by_name is None:
                by_name = {_names(key_paths[i]): i for i in wanted}
            index = by_name.get(_names(like_path))
        if index is None or index in targets:
            problems.append(f"{tree.keystr(like_path)}: in like but not in the checkpoint")
            like_order.append(-1)
            continue
        target = target_of(like_leaf, made)
        targets[index] = target
        like_order.append(index)
        if target is None:
            problems.append(_unsupported(tree.keystr(like_path), like_leaf))
            continue
        leaf = leaves[index]
        if type(leaf) is ArrayLeaf:
            # Equal leaves meet equal targets (shared by target_of): check each pair once.
            seen = (leaf.type, leaf.shape, leaf.dtype, id(target))
            if seen in fine:
                continue
            problem = check_leaf(leaf, target, cast)
            if problem is None and target.kind != "perprocess":
                fine.add(seen)
        else:
            problem = check_leaf(leaf, target, cast)
        if problem:
            problems.append(problem)
    extra = sorted(set(wanted) - set(targets))
    if extra and not partial:
        problems.extend(
            f"{leaves[i].path}: in the checkpoint but not in like (pass partial=True to skip "
            "such leaves, or select= to restore a part)"
            for i in extra
        )
    if problems:
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise TreeMismatchError(
            f"the checkpoint does not match like ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n  {shown}{more}",
            path=opened.where,
            leaf=problems[0].split(":", 1)[0],
        )
    return targets, like_order


def _unsupported(path: str, leaf: Any) -> str:
    name = type(leaf).__qualname__
    if hasattr(leaf, "get_state") and hasattr(leaf, "set_state"):
        return (f"{path}: like holds {_a(name)} with get_state()/set_state(); restore such "
                "objects through a CheckpointManager, or pass like=obj.get_state()")
    return (f"{path}: like holds {_a(name)}, which is not a leaf keepax restores (arrays, "
            "jax.ShapeDtypeStruct, NumPy/Python scalars, str, bytes)")


def value_as(value: Any, target: Target | None, leaf: str) -> Any:
    """A stored Python value as the ``like`` leaf's kind (exactly), for a value leaf.

    Raises:
      TreeMismatchError: the value cannot be represented exactly in the target's kind.
    """
    if target is None or target.kind == type(value).__name__ or target.kind in ("str", "bytes"):
        return value
    try:
        if target.kind == "float":
            out: Any = float(value)
        elif target.kind in ARRAYISH:
            out = np.asarray(value, dtype=target.dtype)
        else:
            return value
        exact = bool(out == value)
    except (OverflowError, ValueError, TypeError):
        exact = False
    if not exact:
        raise TreeMismatchError(
            f"the saved value {value!r} cannot be represented exactly as "
            f"{_a(target.kind if target.dtype is None else str(target.dtype))} "
            "(the like leaf); change that like leaf's dtype",
            leaf=leaf,
        )
    if target.kind == "npscalar":
        return out[()]
    if target.kind == "jax":
        if target.sharding is not None and target.committed:
            return jax.device_put(out, target.sharding)
        placed = jnp.asarray(out)
        return weaken(placed) if target.weak_type else placed
    return out


def array_as_value(host: np.ndarray, kind: str, leaf: str) -> Any:
    """A stored 0-d array as a Python value of ``kind`` (exactly; checked by
    :func:`check_leaf` before anything is read)."""
    item = host[()].item()
    value = {"bool": bool, "int": int, "float": float, "complex": complex}[kind](item)
    if value != item:  # e.g. an int64 beyond a float's 53 bits
        raise TreeMismatchError(
            f"the saved {host.dtype} value {item!r} cannot be represented exactly as "
            f"{_a(kind)}", leaf=leaf,
        )
    return value


def weaken(array: jax.Array) -> jax.Array:
    """Marks an array weakly typed, as its ``like`` leaf was (a Python-scalar-derived value),
    so that a restored state traces exactly like the original and jit does not recompile."""
    from jax._src.lax import lax as lax_internal  # no public API sets weak_type

    return lax_internal._convert_element_type(array, array.dtype, weak_type=True)
