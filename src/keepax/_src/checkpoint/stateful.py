"""Objects with ``get_state()`` / ``set_state()`` (data iterators, host state) in a tree.

On save, each such object is replaced by its ``get_state()`` value, which must be JSON-like
data or numeric arrays (keepax never pickles); in a multi-process run it is kept per process
(:class:`keepax.PerProcess`). On restore, an object found in ``like`` gets
``set_state(saved state)`` (exactly as stored, never cast) and is returned in place. Used by
``keepax.save``/``keepax.restore`` and by the manager alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint.inspection import CheckpointInfo, LeafInfo
from keepax._src.checkpoint.per_process import PerProcess
from keepax.errors import KeepaxError, TreeMismatchError, UnsupportedLeafError

__all__ = ["has_objects", "is_stateful", "restore_objects", "state_tree"]


_PLAIN = frozenset({dict, list, tuple, type(None), np.ndarray, int, float, bool, str, bytes})
"""Types whose instances never have ``get_state`` (no instance attributes): answered at once."""


def is_stateful(x: Any) -> bool:
    """Whether ``x`` is an object with ``get_state()`` and ``set_state()`` (not a class)."""
    return (
        type(x) not in _PLAIN
        and not isinstance(x, type)
        and callable(getattr(x, "get_state", None))
        and callable(getattr(x, "set_state", None))
    )


# ---------------------------------------------------------------------------------------------
# Saving: capture each object's state.


def _check_state_value(value: Any, owner: Any, leaf: str, step: int | None) -> None:
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


def state_tree(state: Any, step: int | None = None) -> tuple[Any, list[str]]:
    """The tree to save: each stateful object replaced by its ``get_state()`` (in a
    multi-process run marked :class:`keepax.PerProcess`: each process's state is its own and
    is restored to the process with the same index); also the key paths of those objects.

    Raises:
      UnsupportedLeafError: A ``get_state()`` value that is not JSON-like data or arrays.
    """
    if not has_objects(state):  # the common case: nothing to rebuild (the save path is hot)
        return state, []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_stateful)
    out, stateful = [], []
    for path, leaf in leaves:
        if is_stateful(leaf):
            value = leaf.get_state()
            where = jax.tree_util.keystr(path)
            _check_state_value(value, leaf, where, step)
            stateful.append(where)
            leaf = PerProcess(value) if jax.process_count() > 1 else value
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


def _like_of(leaf: LeafInfo) -> Any:
    """A ``like`` leaf that restores a stored leaf as it is (no allocation for arrays)."""
    if leaf.shape is None:
        return leaf.value
    if leaf.type == "perprocess":
        return PerProcess(None)
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
# Restoring into the objects of a like tree.


def has_objects(tree: Any, also: type | None = None) -> bool:
    """Whether ``tree`` holds an object with ``get_state()``/``set_state()`` (or, with
    ``also``, an instance of that type: one pass over the tree looks for both)."""
    found: list[bool] = []

    def seen(x: Any) -> bool:  # asks once per node and leaf (not again of each leaf)
        if is_stateful(x) or (also is not None and isinstance(x, also)):
            found.append(True)
            return True
        return False

    jax.tree_util.tree_leaves(tree, is_leaf=seen)
    return bool(found)


Restore = Callable[..., Any]
"""The plain restore of one opened checkpoint: ``restore(like, *, partial=..., **options)``."""


def restore_objects(
    info: CheckpointInfo, like: Any, restore: Restore, *, partial: bool,
    select: Sequence[tuple[Any, ...]] | None = None, **options: Any,
) -> Any:
    """Restores ``like``'s plain leaves with ``restore`` and gives each object in it its saved
    state through ``set_state``; returns ``like``'s structure with the objects in place.

    Raises:
      TreeMismatchError: the checkpoint holds nothing where an object is, or (unless
        ``partial``) holds leaves neither in ``like`` nor under an object.
    """
    found = [p for p, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=is_stateful)[0]
             if is_stateful(x)]
    if options.get("per_process") == "all":
        where = jax.tree_util.keystr(tuple(found[0]))
        raise KeepaxError(
            "per_process='all' restores a list of every process's copy, but like holds "
            f"objects with set_state() (at {where}), which take one state: pass "
            "per_process=k for process k's, or restore without like (their saved states come "
            "back as lists)", path=info.path, leaf=where,
        )
    # Everything but the objects, checked strictly here (the checkpoint is told partial=True
    # because the objects' saved states are not in this like).
    plain_like = jax.tree_util.tree_map(
        lambda x: None if is_stateful(x) else x, like, is_leaf=is_stateful
    )
    if not partial:
        _check_no_extra(info, plain_like, found, select)
    main = plain_like
    if jax.tree_util.tree_leaves(plain_like):
        main = restore(plain_like, partial=True, select=select, **options)
    state_like = jax.tree_util.tree_map_with_path(
        lambda p, x: _state_like(info, p) if is_stateful(x) else None, like, is_leaf=is_stateful
    )
    states = state_like
    if jax.tree_util.tree_leaves(state_like):
        states = restore(state_like, partial=True, stats=options.get("stats"),
                         per_process=options.get("per_process"),
                         deadline=options.get("deadline"))

    def put(_: Any, x: Any, value: Any, state: Any) -> Any:
        if is_stateful(x):
            x.set_state(state)
            return x
        return value

    return jax.tree_util.tree_map_with_path(put, like, main, states, is_leaf=is_stateful)


def _state_like(info: CheckpointInfo, path: Sequence[Any]) -> Any:
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
        _like_of, stored, is_leaf=lambda x: isinstance(x, LeafInfo)
    )


def _check_no_extra(
    info: CheckpointInfo, plain_like: Any, stateful: list[Any],
    select: Sequence[tuple[Any, ...]] | None,
) -> None:
    """Strictness of a restore whose like holds stateful objects: every stored leaf must be
    in like or under one of those objects."""
    in_like = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(plain_like)[0]}
    prefixes = [jax.tree_util.keystr(tuple(p)) for p in stateful]
    scope = ([jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in s)) for s in select]
             if select is not None else [""])
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
