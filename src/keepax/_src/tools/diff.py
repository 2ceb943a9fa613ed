"""Compare two checkpoints leaf by leaf.

Leaves are matched by key path. A leaf is *added* (only in B), *removed* (only in A),
*changed* (its type, shape or dtype differ, or only its saved sharding), *different* (same
description, other values) or *equal* (bit for bit: ``-0.0`` differs from ``0.0``, and NaNs with
the same bits are equal).

Array leaves stored in the same chunks (same boxes) are settled from the chunk checksums
(CRC-32C) without reading data: all checksums equal means equal, any differing means
different. Otherwise both leaves are read, one leaf at a time. With ``values=True`` differing
leaves are always read, for their largest absolute and relative difference.

The user metadata of the two checkpoints is compared and reported, but does not make them
different (two steps of one run always differ in their save time).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import numpy as np

from keepax._src.checkpoint import open_checkpoint
from keepax._src.tools import _common
from keepax._src.tools.export import _contiguous, _plain_array

__all__ = ["diff", "DiffResult", "LeafDiff", "add_diff_parser", "run_diff"]

_BLOCK = 1 << 20  # elements per block when computing differences


@dataclasses.dataclass(frozen=True)
class LeafDiff:
    """How one leaf compares.

    Attributes:
      path: The leaf's key path.
      status: ``equal``, ``different``, ``changed``, ``added`` or ``removed``.
      changes: What differs in its description: any of ``type``, ``shape``, ``dtype``,
        ``sharding``.
      decided_by: ``checksums`` (no data read), ``values`` (both read), ``description``
        (added, removed, or type/shape/dtype changed) or ``value`` (Python values).
      a: ``type``, ``shape``, ``dtype`` (and ``sharding``) in A; None if absent.
      b: The same in B.
      max_abs: With ``values``: the largest absolute difference (numeric leaves).
      max_rel: With ``values``: the largest ``|a - b| / |a|`` over elements where ``a != 0``.
    """

    path: str
    status: str
    changes: tuple[str, ...] = ()
    decided_by: str = "description"
    a: dict[str, Any] | None = None
    b: dict[str, Any] | None = None
    max_abs: float | None = None
    max_rel: float | None = None


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """The comparison of two checkpoints (:func:`diff`).

    Attributes:
      a: Path of the first checkpoint.
      b: Path of the second.
      leaves: Every leaf of either, in A's order then B's additions.
      metadata_changed: Whether their user metadata differ (not counted as a difference).
    """

    a: str
    b: str
    leaves: tuple[LeafDiff, ...]
    metadata_changed: bool

    def _with(self, status: str) -> list[str]:
        return [d.path for d in self.leaves if d.status == status]

    @property
    def added(self) -> list[str]:
        """Leaves only in B."""
        return self._with("added")

    @property
    def removed(self) -> list[str]:
        """Leaves only in A."""
        return self._with("removed")

    @property
    def changed(self) -> list[str]:
        """Leaves whose type, shape, dtype or sharding differ."""
        return self._with("changed")

    @property
    def different(self) -> list[str]:
        """Leaves with the same description and other values."""
        return self._with("different")

    @property
    def equal(self) -> list[str]:
        """Leaves equal bit for bit."""
        return self._with("equal")

    @property
    def identical(self) -> bool:
        """Whether every leaf is equal (metadata aside)."""
        return all(d.status == "equal" for d in self.leaves)

    def summary(self) -> str:
        """One line: ``identical (12 leaves)`` or ``different: 1 added, 2 different, ...``."""
        if self.identical:
            text = f"identical ({len(self.leaves)} leaves)"
        else:
            counts = [f"{len(getattr(self, s))} {s}" for s in
                      ("added", "removed", "changed", "different", "equal")
                      if getattr(self, s)]
            text = "different: " + ", ".join(counts)
        return text + ("; metadata differs" if self.metadata_changed else "")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: ``a``, ``b``, ``identical``, ``summary``, ``metadata_changed`` and
        ``leaves`` (one dict per leaf, fields as :class:`LeafDiff`)."""
        return {
            "a": self.a, "b": self.b, "identical": self.identical, "summary": self.summary(),
            "metadata_changed": self.metadata_changed,
            "leaves": [_leaf_json(d) for d in self.leaves],
        }


def _leaf_json(d: LeafDiff) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    out["changes"] = list(d.changes)
    for key in ("max_abs", "max_rel"):
        if out[key] is not None and not math.isfinite(out[key]):
            out[key] = str(out[key])
    return out


def _describe(leaf: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": leaf.type,
                           "shape": None if leaf.shape is None else list(leaf.shape),
                           "dtype": leaf.dtype}
    if leaf.sharding:
        out["sharding"] = leaf.sharding
    return out


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    return bool(x == y)


def _read(ck: Any, path: str, parts: tuple[Any, ...]) -> np.ndarray:
    for leaf, value in ck.iter_leaves(select=[parts]):
        if leaf.path == path:
            return _contiguous(_plain_array(value))
    raise AssertionError(f"leaf {path} vanished while diffing")  # pragma: no cover


def _compare_arrays(x: np.ndarray, y: np.ndarray, values: bool
                    ) -> tuple[bool, float | None, float | None]:
    """(equal bit for bit, max abs difference, max relative difference) in blocks."""
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    equal = bool(np.array_equal(flat_x.view(np.uint8), flat_y.view(np.uint8)))
    if equal or not values:
        return equal, (0.0 if equal and values else None), (0.0 if equal and values else None)
    if x.dtype.kind not in "biufc" and not _numeric_extra(x.dtype):
        return equal, None, None
    max_abs, max_rel = 0.0, 0.0
    for start in range(0, flat_x.size, _BLOCK):
        a = flat_x[start:start + _BLOCK]
        b = flat_y[start:start + _BLOCK]
        kind = np.complex128 if x.dtype.kind == "c" else np.float64
        a64, b64 = a.astype(kind), b.astype(kind)
        delta = np.abs(a64 - b64)
        with np.errstate(invalid="ignore", divide="ignore"):
            if delta.size:
                max_abs = max(max_abs, float(np.nanmax(delta)) if not np.all(np.isnan(delta))
                              else math.nan)
            nonzero = a64 != 0
            if np.any(nonzero):
                rel = delta[nonzero] / np.abs(a64[nonzero])
                if not np.all(np.isnan(rel)):
                    max_rel = max(max_rel, float(np.nanmax(rel)))
    return equal, max_abs, max_rel


def _numeric_extra(dtype: np.dtype) -> bool:
    """ml_dtypes (bfloat16, float8, int4) have kind 'V' in some NumPy versions."""
    try:
        np.zeros(1, dtype).astype(np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _chunk_map(ck: Any) -> dict[str, dict[Any, int]]:
    out: dict[str, dict[Any, int]] = {}
    for chunk in ck.chunks():
        out.setdefault(chunk.leaf, {})[chunk.box] = chunk.crc32c
    return out


def _kind(leaf_type: str) -> str:
    """jax and numpy arrays compare alike (a restore without ``like`` gives NumPy for both)."""
    return "array" if leaf_type in ("jax", "numpy") else leaf_type


def _compare_leaf(ck_a: Any, ck_b: Any, la: Any, lb: Any, parts: dict[str, Any],
                  chunks: tuple[dict[str, Any], dict[str, Any]], values: bool) -> LeafDiff:
    da, db = _describe(la), _describe(lb)
    changes = tuple(k for k in ("shape", "dtype") if da[k] != db[k])
    if _kind(la.type) != _kind(lb.type):
        changes = ("type", *changes)
    if la.shape is None or lb.shape is None:
        if la.shape is not None or lb.shape is not None:
            changes = changes or ("type",)
    if changes:
        return LeafDiff(la.path, "changed", changes, "description", da, db)
    sharding = ("sharding",) if da.get("sharding") != db.get("sharding") else ()
    if la.shape is None:
        same = _same_value(la.value, lb.value)
        status = "equal" if same else "different"
        return LeafDiff(la.path, "changed" if same and sharding else status, sharding,
                        "value", da, db)
    boxes_a, boxes_b = chunks[0].get(la.path, {}), chunks[1].get(lb.path, {})
    if boxes_a.keys() == boxes_b.keys():
        same = all(boxes_a[box] == boxes_b[box] for box in boxes_a)
        if same or not values:
            status = ("changed" if sharding else "equal") if same else "different"
            zero = 0.0 if same and values else None
            return LeafDiff(la.path, status, sharding, "checksums", da, db, zero, zero)
    x = _read(ck_a, la.path, parts[la.path])
    y = _read(ck_b, lb.path, parts[lb.path])
    equal, max_abs, max_rel = _compare_arrays(x, y, values)
    del x, y
    status = ("changed" if sharding else "equal") if equal else "different"
    return LeafDiff(la.path, status, sharding, "values", da, db, max_abs, max_rel)


def diff(a: str, b: str, *, values: bool = False, progress: Any = None,
         storage_options: dict[str, Any] | None = None) -> DiffResult:
    """Compares two checkpoints leaf by leaf (module docs), reading data only where chunk
    checksums cannot settle it, one leaf at a time.

    Args:
      a: The first checkpoint's path or URL.
      b: The second's.
      values: For differing numeric leaves, compute the largest absolute and relative
        differences (reads both leaves).
      progress: Called with (leaves compared, total leaves).
      storage_options: For URLs, as for :func:`keepax.save`.

    Returns:
      The comparison; ``result.identical``, ``result.summary()``, ``result.to_json()``.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError: a checkpoint cannot
        be opened.
    """
    ck_a = open_checkpoint(a, storage_options=storage_options)
    ck_b = open_checkpoint(b, storage_options=storage_options)
    leaves_a = {leaf.path: leaf for leaf in ck_a.info.leaves}
    leaves_b = {leaf.path: leaf for leaf in ck_b.info.leaves}
    parts = {**_common.leaf_parts(ck_b.info.tree), **_common.leaf_parts(ck_a.info.tree)}
    chunks = (_chunk_map(ck_a), _chunk_map(ck_b))
    out: list[LeafDiff] = []
    total = len(leaves_a) + sum(1 for p in leaves_b if p not in leaves_a)
    for path, la in leaves_a.items():
        lb = leaves_b.get(path)
        if lb is None:
            out.append(LeafDiff(path, "removed", a=_describe(la)))
        else:
            out.append(_compare_leaf(ck_a, ck_b, la, lb, parts, chunks, values))
        if progress is not None:
            progress(len(out), total)
    for path, lb in leaves_b.items():
        if path not in leaves_a:
            out.append(LeafDiff(path, "added", b=_describe(lb)))
            if progress is not None:
                progress(len(out), total)
    return DiffResult(ck_a.path, ck_b.path, tuple(out), ck_a.metadata != ck_b.metadata)


# ---------------------------------------------------------------------------------------------
# Command line.


def add_diff_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax diff A B [--values] [--json]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "diff", help="compare two checkpoints leaf by leaf",
        description="Compare two checkpoints. Exit 0 when identical, 1 when different, "
                    "2 on error.")
    parser.add_argument("a", help="first checkpoint (path or URL)")
    parser.add_argument("b", help="second checkpoint (path or URL)")
    parser.add_argument("--values", action="store_true",
                        help="max absolute/relative difference of differing leaves")
    parser.add_argument("--all", action="store_true", help="also list equal leaves")
    _common.add_common(parser)
    parser.set_defaults(run=run_diff)
    return parser


def _line(d: LeafDiff) -> str:
    def text(side: dict[str, Any] | None) -> str:
        if side is None:
            return "-"
        if side["shape"] is None:
            return side["type"]
        return f"{side['dtype']}{side['shape']}"

    if d.status == "added":
        return f"added      {d.path}  {text(d.b)}"
    if d.status == "removed":
        return f"removed    {d.path}  {text(d.a)}"
    if d.status == "changed":
        return f"changed    {d.path}  {', '.join(d.changes)}: {text(d.a)} -> {text(d.b)}"
    extra = ""
    if d.max_abs is not None:
        extra = f"  max abs {d.max_abs:.6g}, max rel {d.max_rel:.6g}"
    return f"{d.status:<10} {d.path}{extra}  (by {d.decided_by})"


def run_diff(args: argparse.Namespace) -> int:
    """Runs ``keepax diff``; exit 0 identical, 1 different, 2 error."""

    def body() -> int:
        with _common.Progress("diff", quiet=args.quiet, unit="leaf") as bar:
            result = diff(args.a, args.b, values=args.values, progress=bar,
                          storage_options=_common.storage_options(args))
        if args.json:
            _common.print_json(result.to_json())
        else:
            for d in result.leaves:
                if d.status != "equal" or args.all:
                    print(_line(d))
            print(result.summary())
        return 0 if result.identical else 1

    return _common.run_cli("diff", body)
