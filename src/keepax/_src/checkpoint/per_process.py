"""Values kept per process: :class:`PerProcess`, how a save stores each process's copy and
how a restore gives each process its own.

A multi-process save stores one copy of every value that is not part of a global
``jax.Array`` (and fails, naming the leaf, if the processes hold different ones). A value
marked ``PerProcess(value)`` is stored once *per process* instead: each process serialises its
value as a single-file checkpoint (``docs/FORMAT.md`` §13), length-prefixed, and writes it as
its own row of a ``uint8`` array of shape ``(process_count, width)`` (type ``perprocess``),
``width`` being the longest copy. A restore reads the row of its own process index.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint import container
from keepax._src.checkpoint.plan import ProcessRows
from keepax._src.format import tree
from keepax._src.format.manifest import ArrayLeaf
from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = ["PerProcess", "PerProcessChoice", "decode_row", "encode", "rows_wanted",
           "take_apart"]

PerProcessChoice = int | str | None
"""How a restore picks among per-process copies: None (this process's own, on the same
process count), ``k`` (process ``k``'s, on every process) or ``"all"`` (a list of every
process's)."""

_PREFIX = struct.Struct("<Q")


class PerProcess:
    """Marks a value that is each process's own, e.g. a data iterator's state.

    In a multi-process save, each process stores its own copy of a marked value (any pytree
    of host values: NumPy arrays, Python scalars, str, bytes, in dicts, lists and tuples), and
    a restore gives each process the copy saved by the process with its index. Unmarked
    values that differ between processes fail the save instead of being collapsed into one
    copy. In a single-process save, the value is stored as one process's copy.

    Restore with ``like`` holding ``PerProcess(...)`` (or no ``like``) at the same place; the
    restored tree holds the value itself. Restoring on another process count raises, unless
    ``keepax.restore(..., per_process=k)`` (process ``k``'s copy) or ``per_process="all"``
    (the list of every process's copy) says which copy to take.

    Args:
      value: The value (in ``like`` trees, anything: it is not used).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerProcess({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerProcess) and _same(self.value, other.value)

    __hash__ = None  # type: ignore[assignment]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))
    except (TypeError, ValueError):
        return False


def _is_marker(x: Any) -> bool:
    return isinstance(x, PerProcess)


def encode(value: Any) -> bytes:
    """A per-process value as one row's bytes: its length, then a single-file checkpoint."""
    blob = container.dump_bytes(value)
    return _PREFIX.pack(len(blob)) + blob


def take_apart(tree_: Any, process: int, count: int) -> tuple[Any, dict[str, bytes]]:
    """The tree with every :class:`PerProcess` leaf encoded (as :class:`ProcessRows` of this
    process's copy alone), and each such leaf's bytes by leaf path.

    Raises:
      UnsupportedLeafError: a marked value holds a leaf that cannot be stored.
    """
    found: dict[str, bytes] = {}
    if not any(map(_is_marker, jax.tree_util.tree_leaves(tree_, is_leaf=_is_marker))):
        return tree_, found  # the common case, without rebuilding the tree

    def one(path: Any, x: Any) -> Any:
        if not _is_marker(x):
            return x
        data = encode(x.value)
        found[tree.keystr(path)] = data
        return ProcessRows(np.frombuffer(data, np.uint8), process, count, len(data))

    out = jax.tree_util.tree_map_with_path(one, tree_, is_leaf=_is_marker)
    return (out, found) if found else (tree_, found)


def widen(tree_: Any, widths: dict[str, int]) -> Any:
    """The tree :func:`take_apart` made, with each row padded to the agreed width."""

    def one(path: Any, x: Any) -> Any:
        if not isinstance(x, ProcessRows):
            return x
        width = widths[tree.keystr(path)]
        row = np.zeros(width, np.uint8)
        row[: x.row.size] = x.row
        return ProcessRows(row, x.process, x.count, width)

    return jax.tree_util.tree_map_with_path(one, tree_, is_leaf=lambda x: isinstance(
        x, ProcessRows))


def rows_wanted(leaf: ArrayLeaf, choice: PerProcessChoice, where: str) -> list[int]:
    """The rows (process indices) of a per-process leaf a restore reads.

    Raises:
      KeepaxError: The leaf was saved by another number of processes and ``choice`` does
        not say which copy to take, or names no saving process.
    """
    saved = int(leaf.shape[0])
    if choice == "all":
        return list(range(saved))
    if choice is None:
        if saved != jax.process_count():
            raise KeepaxError(
                f"this value was saved per process by {saved} processes and this run has "
                f"{jax.process_count()}: pass per_process=k to restore process k's copy on "
                "every process, or per_process='all' for the list of every process's copy",
                path=where, leaf=leaf.path)
        return [jax.process_index()]
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < saved:
        raise KeepaxError(
            f"per_process={choice!r} names no process that saved this value (it was saved by "
            f"{saved}); pass an index below {saved}, 'all', or None", path=where, leaf=leaf.path)
    return [choice]


Load = Callable[[bytes, Any, str], Any]
"""Restores the tree in a container's bytes onto ``like`` (the restore code passes its own, so
this module never imports it back)."""


def decode_row(data: np.ndarray, like: Any, leaf: str, where: str, load: Load) -> Any:
    """A per-process value from its row's bytes.

    Raises:
      CorruptCheckpointError: The row does not hold a valid copy.
    """
    raw = data.tobytes()
    if len(raw) < _PREFIX.size or _PREFIX.unpack_from(raw)[0] > len(raw) - _PREFIX.size:
        raise CorruptCheckpointError("a per-process copy's length is damaged", path=where,
                                     leaf=leaf)
    (length,) = _PREFIX.unpack_from(raw)
    return load(raw[_PREFIX.size:_PREFIX.size + length], like, f"{where} ({leaf})")


def decode_rows(
    rows: Sequence[np.ndarray], like: Any, leaf: str, where: str, as_list: bool, load: Load
) -> Any:
    """The value of one row, or (``as_list``) the list of every row's value."""
    values = [decode_row(r, like, leaf, where, load) for r in rows]
    return values if as_list else values[0]
