"""A step's tree in the manager: the ``items`` a restore selects, restored through one
opened :class:`~keepax._src.checkpoint.Checkpoint` (objects with ``get_state()`` /
``set_state()`` are handled by the checkpoint layer: ``checkpoint/stateful.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keepax._src import checkpoint
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax._src.checkpoint.stateful import is_stateful, state_tree
from keepax.errors import KeepaxError

__all__ = ["is_stateful", "item_names", "restore_step", "restore_tree", "state_tree"]


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
    """Restores a step from its opened checkpoint (its manifest is not read again), the
    ``items`` it names only.

    Stateful objects in ``like`` get ``set_state`` with their saved state, exactly as stored
    (never cast); everything else is restored as :func:`keepax.restore` does. ``per_process``
    picks the copy of per-process values (stateful objects' states included) as for
    :func:`keepax.restore`.
    """
    select = [(n,) for n in items] if items is not None else None
    if like is None:
        return opened.restore(select=select, dtype=dtype, stats=stats, per_process=per_process)
    if items is not None:
        like = _pick_items(like, items, opened.info.path)
    return opened.restore(like, select=select, partial=partial, dtype=dtype, stats=stats,
                          per_process=per_process)
