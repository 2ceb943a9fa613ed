"""Objects with ``get_state()`` / ``set_state()`` (data iterators, host state) in a step's tree.

On save, each such object is replaced by its ``get_state()`` value, which must be JSON-like
data or numeric arrays (keepax never pickles). On restore, the object found in ``like`` gets
``set_state(saved state)`` and is returned in place. This module also restores a step's tree
through one opened :class:`~keepax._src.checkpoint.Checkpoint`, with the manager's ``items``
selection and its strictness rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src import checkpoint
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax.errors import KeepaxError, TreeMismatchError, UnsupportedLeafError

__all__ = ["is_stateful", "item_names", "restore_step", "restore_tree", "state_tree"]


def is_stateful(x: Any) -> bool:
    """Whether ``x`` is an object with ``get_state()`` and ``set_state()`` (not a class)."""
    return (
        not isinstance(x, type)
        and callable(getattr(x, "get_state", None))
        and callable(getattr(x, "set_state", None))
    )


# ---------------------------------------------------------------------------------------------
# Saving: capture each object's state.


def _check_state_value(value: Any, owner: Any, leaf: str, step: int) -> None:
    """Checks that a get_state() value is JSON-like data or arrays (never pickled)."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        dtype = value.dtype
        if dtype == np.dtype(object) or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise UnsupportedLeafError(
                f"get_state() of {type(owner).__name__} returned an array of dtype {dtype}; "
                "return numeric arrays (for PRNG keys, jax.random.key_data(key))",
                leaf=leaf, step=step,
            )
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnsupportedLeafError(
                    f"get_state() of {type(owner).__name__} returned a dict with key {key!r}; "
                    "state dicts need str keys (as in JSON)",
                    leaf=leaf, step=step,
                )
            _check_state_value(item, owner, f"{leaf}[{key!r}]", step)
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_state_value(item, owner, f"{leaf}[{i}]", step)
        return
    raise UnsupportedLeafError(
        f"get_state() of {type(owner).__name__} returned a {type(value).__name__}; state must "
        "be JSON-like (dict with str keys, list, tuple, str, int, float, bool, None, bytes) or "
        "arrays: keepax never pickles",
        leaf=leaf, step=step,
    )


def state_tree(state: Any, step: int) -> tuple[Any, list[str]]:
    """The tree to save: each stateful object replaced by its ``get_state()`` (in a
    multi-process run marked :class:`keepax.PerProcess`: each process's state is its own and
    is restored to the process with the same index); also the key paths of those objects.

    Raises:
      UnsupportedLeafError: A ``get_state()`` value that is not JSON-like data or arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_stateful)
    out, stateful = [], []
    for path, leaf in leaves:
        if is_stateful(leaf):
            value = leaf.get_state()
            where = jax.tree_util.keystr(path)
            _check_state_value(value, leaf, where, step)
            stateful.append(where)
            leaf = checkpoint.PerProcess(value) if jax.process_count() > 1 else value
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out), stateful


# ---------------------------------------------------------------------------------------------
# Tree helpers.


def _entry_name(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unknown key entry {entry!r}")


def _subtree(plain: Any, path: Sequence[Any]) -> Any:
    """The subtree at ``path`` of a plain tree as :func:`keepax.inspect` describes it."""
    node = plain
    for entry in path:
        node = node[_entry_name(entry)]
    return node


def _like_of(leaf: checkpoint.LeafInfo) -> Any:
    """A ``like`` leaf that restores a stored leaf as it is (no allocation for arrays)."""
    if leaf.shape is None:
        return leaf.value
    if leaf.type == "perprocess":
        return checkpoint.PerProcess(None)
    if leaf.type == "bytes":
        return b""
    dtype = jax.numpy.dtype(leaf.dtype)
    if leaf.type == "jax":
        return jax.ShapeDtypeStruct(leaf.shape, dtype)
    if leaf.type == "npscalar":
        return np.zeros((), dtype)[()]
    return np.broadcast_to(np.zeros((), dtype), leaf.shape)


def _under(path: str, prefix: str) -> bool:
    """Whether the key path string ``path`` is ``prefix`` or lies below it."""
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] in "[.")


# ---------------------------------------------------------------------------------------------
# Restoring a step's tree (items, stateful objects, strictness).


def item_names(info: checkpoint.CheckpointInfo, items: Any) -> list[str] | None:
    """``restore``'s ``items`` as a list of names the step holds (None: everything).

    Raises:
      KeepaxError: Malformed ``items``, a state that is not a dict, or an unknown item.
    """
    if items is None:
        return None
    names = [items] if isinstance(items, str) else list(items)
    if not names or not all(isinstance(n, str) for n in names):
        raise KeepaxError(f"items must be item names such as ['params'], got {items!r}",
                          path=info.path)
    held = sorted(map(str, info.tree)) if isinstance(info.tree, dict) else None
    if held is None:
        raise KeepaxError(
            "items= needs a step whose state is a dict of named items; this step's state is a "
            f"{type(info.tree).__name__}: restore it whole",
            path=info.path,
        )
    unknown = [n for n in names if n not in info.tree]
    if unknown:
        raise KeepaxError(
            f"item(s) {', '.join(map(repr, unknown))} not in this step; it holds: "
            f"{', '.join(held)}",
            path=info.path,
        )
    return names


def _pick_items(like: Any, names: list[str], where: str) -> dict[str, Any]:
    if not isinstance(like, Mapping) or any(n not in like for n in names):
        raise KeepaxError(
            f"with items={names!r}, like must be a dict holding those items (the whole state "
            "or just them)",
            path=where,
        )
    return {n: like[n] for n in names}


def restore_step(path: str, step: int, storage_options: dict[str, Any] | None, like: Any,
                 items: Any, partial: bool, dtype: Any, stats: checkpoint.RestoreStats | None,
                 per_process: PerProcessChoice) -> Any:
    """Opens step ``step`` at ``path`` (its manifest is read once) and restores it as
    :meth:`CheckpointManager.restore` says; an error raised names the step."""
    try:
        opened = checkpoint.open_checkpoint(path, storage_options=storage_options)
        names = item_names(opened.info, items)
        return restore_tree(opened, like, names, partial, dtype, stats, per_process)
    except KeepaxError as e:
        if e.step is None:
            e.step = step
        raise


def restore_tree(
    opened: checkpoint.Checkpoint,
    like: Any,
    items: list[str] | None,
    partial: bool,
    dtype: Any,
    stats: checkpoint.RestoreStats | None,
    per_process: PerProcessChoice = None,
) -> Any:
    """Restores a step from its opened checkpoint (its manifest is not read again).

    Stateful objects in ``like`` get ``set_state`` with their saved state, exactly as stored
    (never cast); everything else is restored as :func:`keepax.restore` does. ``per_process``
    picks the copy of per-process values (stateful objects' states included) as for
    :func:`keepax.restore`.
    """
    info = opened.info
    select = [(n,) for n in items] if items is not None else None
    if like is None:
        return opened.restore(select=select, dtype=dtype, stats=stats, per_process=per_process)
    if items is not None:
        like = _pick_items(like, items, info.path)
    found = [p for p, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_stateful)[0]
             if is_stateful(x)]
    if not found:
        return opened.restore(like, select=select, partial=partial, dtype=dtype, stats=stats,
                              per_process=per_process)
    if per_process == "all":
        raise KeepaxError(
            "per_process='all' restores a list of every process's copy, but like holds "
            f"objects with set_state() (at {jax.tree_util.keystr(tuple(found[0]))}), which "
            "take one state: pass per_process=k for process k's, or restore without like "
            "(their saved states come back as lists)",
            path=info.path, leaf=jax.tree_util.keystr(tuple(found[0])),
        )
    # Everything but the stateful objects, checked strictly here (the checkpoint is told
    # partial=True because the objects' saved states are not in this like).
    plain_like = jax.tree_util.tree_map(
        lambda x: None if is_stateful(x) else x, like, is_leaf=is_stateful
    )
    if not partial:
        _check_no_extra(info, plain_like, found, items)
    main = plain_like
    if jax.tree_util.tree_leaves(plain_like):
        main = opened.restore(plain_like, select=select, partial=True, dtype=dtype, stats=stats,
                              per_process=per_process)
    state_like = jax.tree_util.tree_map_with_path(
        lambda p, x: _state_like(info, p) if is_stateful(x) else None, like, is_leaf=is_stateful
    )
    states = state_like
    if jax.tree_util.tree_leaves(state_like):
        states = opened.restore(state_like, partial=True, stats=stats, per_process=per_process)

    def put(_: Any, x: Any, value: Any, state: Any) -> Any:
        if is_stateful(x):
            x.set_state(state)
            return x
        return value

    return jax.tree_util.tree_map_with_path(put, like, main, states, is_leaf=is_stateful)


def _state_like(info: checkpoint.CheckpointInfo, path: Sequence[Any]) -> Any:
    where = jax.tree_util.keystr(tuple(path))
    try:
        stored = _subtree(info.tree, path)
    except (KeyError, IndexError, TypeError):
        raise TreeMismatchError(
            f"like holds an object with get_state()/set_state() at {where}, but the checkpoint "
            "has nothing there",
            path=info.path, leaf=where,
        ) from None
    return jax.tree_util.tree_map(
        _like_of, stored, is_leaf=lambda x: isinstance(x, checkpoint.LeafInfo)
    )


def _check_no_extra(
    info: checkpoint.CheckpointInfo, plain_like: Any, stateful: list[Any], items: list[str] | None
) -> None:
    """Strictness of a restore whose like holds stateful objects: every stored leaf must be
    in like or under one of those objects."""
    in_like = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(plain_like)[0]}
    prefixes = [jax.tree_util.keystr(tuple(p)) for p in stateful]
    scope = [f"[{n!r}]" for n in items] if items is not None else [""]
    extra = [
        leaf.path for leaf in info.leaves
        if leaf.path not in in_like
        and any(_under(leaf.path, s) for s in scope)
        and not any(_under(leaf.path, p) for p in prefixes)
    ]
    if extra:
        shown = "\n  ".join(f"{p}: in the checkpoint but not in like" for p in extra[:25])
        raise TreeMismatchError(
            f"the checkpoint does not match like ({len(extra)} problem"
            f"{'s' if len(extra) != 1 else ''}; pass partial=True to skip such leaves):\n"
            f"  {shown}",
            path=info.path, leaf=extra[0],
        )
