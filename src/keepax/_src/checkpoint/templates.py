"""Restoring without a ``like`` tree: placing arrays from sharding rules, and rebuilding the
container types the caller names as trusted.

Nothing here imports or calls anything a checkpoint names: a saved container comes back as
one of the caller's classes only when its recorded ``module.qualname`` is one the caller
passed, and it is rebuilt by calling that class with the stored fields.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint.inspection import LeafInfo, info_of
from keepax._src.checkpoint.matching import Target, final_dtype
from keepax._src.checkpoint.opening import Opened
from keepax._src.format import dtypes, tree
from keepax._src.format.manifest import ArrayLeaf
from keepax.errors import KeepaxError

__all__ = ["Shardings", "node_builder", "placement_targets"]

Shardings = (
    Callable[[str, LeafInfo], jax.sharding.Sharding | None]
    | Sequence[tuple[str, jax.sharding.Sharding]]
)
"""Where to place each array of a template-free restore: a function of (name, leaf info), or
``(regex, sharding)`` rules tried in order against the leaf's name (``params/dense/kernel``)."""


def leaf_name(path: tree.KeyPath) -> str:
    """A leaf's name for sharding rules: its key names joined by ``/``."""
    return "/".join(str(tree.entry_name(entry)) for entry in path)


def _rule_function(rules: Sequence[tuple[str, jax.sharding.Sharding]], where: str
                   ) -> Callable[..., Any]:
    try:
        compiled = [(re.compile(pattern), sharding) for pattern, sharding in rules]
    except (TypeError, ValueError, re.error) as e:
        raise KeepaxError(f"shardings= rules must be (regex, Sharding) pairs, e.g. "
                          f"[(r'kernel$', NamedSharding(mesh, P(None, 'model')))]: {e}",
                          path=where) from e

    def pick(name: str, _: LeafInfo) -> jax.sharding.Sharding | None:
        for pattern, sharding in compiled:
            if pattern.search(name):
                return sharding
        return None

    return pick


def placement_targets(
    opened: Opened, wanted: Sequence[int], shardings: Shardings | None, cast: Any
) -> dict[int, Target | None]:
    """The targets of a template-free restore: ``jax.Array`` on the sharding each rule gives,
    NumPy where none does (or when ``shardings`` is None).

    Raises:
      KeepaxError: a sharding does not fit the leaf's shape, or is not a Sharding.
    """
    if shardings is None:
        return {}
    pick = shardings if callable(shardings) else _rule_function(shardings, opened.where)
    infos = info_of(opened).leaves
    targets: dict[int, Target | None] = {}
    for index in wanted:
        leaf = opened.manifest.leaves[index]
        if not isinstance(leaf, ArrayLeaf) or leaf.type not in ("jax", "numpy", "npscalar"):
            continue
        sharding = pick(leaf_name(opened.key_paths[index]), infos[index])
        if sharding is None:
            continue
        if not isinstance(sharding, jax.sharding.Sharding):
            raise KeepaxError(f"shardings= gave {type(sharding).__name__}, not a Sharding",
                              path=opened.where, leaf=leaf.path)
        shape = tuple(leaf.shape)
        try:
            # Named and positional shardings check the rank; the abstract type lacks it.
            check = getattr(sharding, "check_compatible_aval", None)
            if check is not None:
                check(shape)
            sharding.shard_shape(shape)
        except (ValueError, TypeError) as e:
            raise KeepaxError(f"the sharding given does not fit shape {shape}: {e}",
                              path=opened.where, leaf=leaf.path) from e
        stored = dtypes.dtype_from_name(leaf.dtype)
        targets[index] = Target("jax", shape, np.dtype(final_dtype(stored, None, cast)), sharding)
    return targets


def node_builder(types: Sequence[type], where: str) -> Callable[..., Any]:
    """The ``node`` hook of :func:`tree.rebuild_plain` that rebuilds the trusted ``types``.

    Raises:
      KeepaxError: an entry of ``types`` is not a namedtuple or dataclass type.
    """
    trusted: dict[str, type] = {}
    for cls in types:
        is_namedtuple = isinstance(cls, type) and issubclass(cls, tuple) and hasattr(
            cls, "_fields"
        )
        if not (is_namedtuple or (isinstance(cls, type) and dataclasses.is_dataclass(cls))):
            raise KeepaxError(
                f"types= takes namedtuple and dataclass classes; {cls!r} is neither (restore "
                "other containers with like=)", path=where,
            )
        trusted[f"{cls.__module__}.{cls.__qualname__}"] = cls

    def build(type_name: str | None, names: list[Any], values: list[Any]) -> Any:
        cls = trusted.get(type_name or "")
        if cls is None:
            return None
        fields = dict(zip(names, values))
        if not dataclasses.is_dataclass(cls):
            if list(names) != list(cls._fields):  # type: ignore[attr-defined]
                raise KeepaxError(f"{type_name} was saved with fields {names}, the class has "
                                  f"{list(cls._fields)}", path=where)  # type: ignore[attr-defined]
            return cls(*values)
        init = [f.name for f in dataclasses.fields(cls) if f.init]
        missing = [name for name in init if name not in fields]
        if missing:
            raise KeepaxError(
                f"{type_name} fields {missing} are not stored in the checkpoint (static "
                "fields, such as a TrainState's apply_fn and tx); restore with like= "
                "(e.g. like=TrainState.create(...)) instead", path=where,
            )
        return cls(**{name: fields[name] for name in init})

    return build
