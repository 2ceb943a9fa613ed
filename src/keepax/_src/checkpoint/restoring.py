"""Restoring a checkpoint: match the stored leaves against a ``like`` tree (or rebuild plain
containers), read the boxes each process needs with ranged, verified reads, cast, and place
the arrays on the requested shardings (one batched ``jax.device_put``).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keepax._src.checkpoint import per_process as per_process_
from keepax._src.checkpoint.opening import Opened, open_path, opened_manifest, vanishing
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax._src.checkpoint.plan import is_key_array
from keepax._src.format import boxes as sharding
from keepax._src.format import datafiles as format
from keepax._src.format import dtypes, tables, tree
from keepax._src.format.datafiles import ReadRequest, RestoreStats
from keepax._src.format.manifest import ArrayLeaf, Manifest, ValueLeaf
from keepax._src.io import Storage
from keepax.errors import CorruptCheckpointError, KeepaxError, TreeMismatchError

__all__ = [
    "RestoreStats", "decode_value", "read_plain", "restore", "restore_manifest", "restore_opened",
    "selected_indices",
]


@dataclasses.dataclass(frozen=True)
class _Target:
    """What the caller wants a leaf restored as (from its `like` leaf)."""

    kind: str  # "jax", "numpy", "npscalar", "prngkey", "bytes", or a value type
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    sharding: jax.sharding.Sharding | None = None
    weak_type: bool = False
    committed: bool = True
    like: Any = None  # for "perprocess": the like of the marked value


def _target_of(like_leaf: Any) -> _Target | None:
    x = like_leaf
    if isinstance(x, per_process_.PerProcess):
        return _Target("perprocess", like=x.value)
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
        if is_key_array(x):
            return _Target("prngkey", tuple(x.shape), None, getattr(x, "sharding", None))
        return _Target(
            "jax",
            tuple(x.shape),
            np.dtype(x.dtype),
            getattr(x, "sharding", None),
            bool(getattr(x, "weak_type", False)),
            # An array made by jnp.asarray is "uncommitted"; jit treats the two differently
            # (it recompiles), so a restore reproduces it. No public API exposes the flag.
            bool(getattr(x, "_committed", True)),
        )
    if isinstance(x, np.ndarray):
        return _Target("numpy", tuple(x.shape), x.dtype)
    if isinstance(x, np.generic):
        return _Target("npscalar", (), np.dtype(x.dtype))
    if isinstance(x, bytes):
        return _Target("bytes")
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("complex", complex),
                        ("str", str)):
        if isinstance(x, types):
            return _Target(kind)
    return None


_ARRAYISH = ("jax", "numpy", "npscalar")


def _resolve_cast(dtype: Any) -> Any:
    if dtype is None or (isinstance(dtype, str) and dtype == "like"):
        return dtype
    return np.dtype(dtypes.dtype_from_name(jnp.dtype(dtype).name))


def _final_dtype(stored: np.dtype, target: _Target | None, cast: Any) -> np.dtype:
    """The dtype a leaf is restored as."""
    if isinstance(cast, np.dtype):
        return cast if jnp.issubdtype(stored, jnp.floating) else stored
    if cast == "like" and target is not None and target.dtype is not None:
        return target.dtype
    return stored


def _check_leaf(leaf: Any, target: _Target | None, cast: Any) -> str | None:
    """Why a stored leaf cannot be restored as the target, or None."""
    if target is None:
        return f"{leaf.path}: like holds an unsupported leaf type"
    if isinstance(leaf, ValueLeaf):
        if target.kind != leaf.type:
            return f"{leaf.path}: checkpoint holds a {leaf.type}, like a {target.kind}"
        return None
    if leaf.type in _ARRAYISH:
        if target.kind not in _ARRAYISH:
            return f"{leaf.path}: checkpoint holds an array, like a {target.kind}"
    elif leaf.type != target.kind:
        return f"{leaf.path}: checkpoint holds {leaf.type}, like a {target.kind}"
    if leaf.type == "prngkey":
        key_shape = leaf.shape[: len(target.shape or ())]
        if tuple(key_shape) != target.shape:
            return f"{leaf.path}: key shape {key_shape} in checkpoint, {target.shape} in like"
        return None
    if target.shape is not None and tuple(leaf.shape) != target.shape:
        return f"{leaf.path}: shape {tuple(leaf.shape)} in checkpoint, {target.shape} in like"
    if target.dtype is not None:
        final = _final_dtype(dtypes.dtype_from_name(leaf.dtype), target, cast)
        if final != target.dtype:
            hint = "pass dtype='like' to cast" if cast is None else "adjust dtype="
            return (
                f"{leaf.path}: dtype {final} from checkpoint, {target.dtype} in like ({hint})"
            )
    return None


def _normalize_select(select: Any) -> list[tuple[Any, ...]] | None:
    if select is None:
        return None
    if isinstance(select, str | tuple):
        select = [select]
    out = []
    for s in select:
        if isinstance(s, str):
            out.append(tuple(p for p in s.split("/") if p))
        elif isinstance(s, tuple | list):
            out.append(tuple(s))
        else:
            raise TypeError(f"select entries must be str or tuples of keys, got {s!r}")
    return out


def restore(
    path: str,
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    stats: RestoreStats | None = None,
    storage_options: dict[str, Any] | None = None,
    per_process: PerProcessChoice = None,
) -> Any:
    """Restores a checkpoint.

    Args:
      path: The checkpoint's path or URL.
      like: Optional pytree of the same structure, whose leaves are arrays (``jax.Array``,
        ``np.ndarray``), ``jax.ShapeDtypeStruct`` (with or without ``sharding``) or values of
        the expected Python types. Arrays come back as the ``like`` leaf's kind: ``jax.Array``
        placed on its sharding (the default device when it has none), or NumPy. Without
        ``like``, the tree comes back as nested dicts, lists and tuples of NumPy arrays and
        Python values (namedtuples, dataclasses and custom nodes as dicts), on any machine.
      select: Restore only these subtrees: key paths given as ``"params/dense"`` (``str()`` of
        each key) or as tuples of keys. Other leaves' bytes are not read.
      partial: With ``like``, allow the checkpoint to hold leaves ``like`` lacks (they are not
        read). Leaves in ``like`` but not in the checkpoint are always an error.
      dtype: ``None`` (default): dtypes must match ``like`` exactly. ``"like"``: cast each leaf
        to its ``like`` dtype. A dtype: cast every floating-point array to it.
      stats: If given, filled with what was read.
      storage_options: For URLs (``s3://...``): fsspec options and keepax's ``keepax_*``
        transfer options, as for :func:`save`.
      per_process: Which copy of each :class:`keepax.PerProcess` value to restore: None
        (default) this process's own (the checkpoint must have been saved by as many
        processes as this run has), ``k`` process ``k``'s on every process, or ``"all"`` the
        list of every process's copy.

    Returns:
      The restored tree (per-process values as the value itself, unmarked).

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError:
        the checkpoint is missing, incomplete, damaged or too new.
      TreeMismatchError: ``like`` does not match; the message lists every offending leaf.
      KeepaxError: a per-process value was saved by another number of processes and
        ``per_process`` does not say which copy to take (the message names the leaf).
    """
    return restore_opened(open_path(path, storage_options), like, select, partial, dtype, stats,
                          per_process)


def restore_manifest(
    storage: Storage,
    name: str,
    where: str,
    manifest: Manifest,
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    stats: RestoreStats | None = None,
) -> Any:
    """:func:`restore` from a validated manifest whose data files ``storage`` opens under
    ``name`` (how single-file checkpoints share the directory format's reading code).

    Raises:
      CorruptCheckpointError, TreeMismatchError: as :func:`restore`.
    """
    return restore_opened(opened_manifest(storage, name, where, manifest), like, select, partial,
                          dtype, stats)


def restore_opened(
    opened: Opened,
    like: Any,
    select: str | Sequence[str | tuple[Any, ...]] | None,
    partial: bool,
    dtype: Any,
    stats: RestoreStats | None,
    per_process: PerProcessChoice = None,
) -> Any:
    """Restores from an opened checkpoint; arguments as for :func:`restore`."""
    manifest = opened.manifest
    cast = _resolve_cast(dtype)
    selectors = _normalize_select(select)
    wanted = selected_indices(opened, select)
    if like is not None:
        like_leaves, like_def = jax.tree_util.tree_flatten_with_path(like)
        targets, like_order = _match_like(opened, wanted, like_leaves, partial, cast)
        values = _read_leaves(opened, sorted(targets), targets, cast, stats, per_process)
        return jax.tree_util.tree_unflatten(like_def, [values[i] for i in like_order])
    values = _read_leaves(opened, wanted, {}, cast, stats, per_process)
    keep = None
    if selectors is not None:
        keep = lambda p: any(tree.path_matches(p, s) for s in selectors)  # noqa: E731
    return tree.rebuild_plain(manifest.tree, values.__getitem__, keep=keep)


def _match_like(
    opened: Opened, wanted: Sequence[int], like_leaves: Sequence[tuple[Any, Any]],
    partial: bool, cast: Any,
) -> tuple[dict[int, _Target | None], list[int]]:
    """Pairs the ``like`` leaves with the wanted stored leaves; returns each stored leaf's
    target and, per ``like`` leaf, the stored leaf it gets.

    Raises:
      TreeMismatchError: listing every leaf that does not match.
    """
    leaves = opened.manifest.leaves
    targets: dict[int, _Target | None] = {}
    like_order: list[int] = []
    by_path = {leaves[i].path: i for i in wanted}
    problems: list[str] = []
    for like_path, like_leaf in like_leaves:
        text = tree.keystr(like_path)
        index = by_path.get(text)
        if index is None:
            problems.append(f"{text}: in like but not in the checkpoint")
            like_order.append(-1)
            continue
        target = _target_of(like_leaf)
        targets[index] = target
        like_order.append(index)
        problem = _check_leaf(leaves[index], target, cast)
        if problem:
            problems.append(problem)
    extra = sorted(set(wanted) - set(targets))
    if extra and not partial:
        problems.extend(
            f"{leaves[i].path}: in the checkpoint but not in like (pass "
            "partial=True to skip such leaves)"
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


def selected_indices(
    opened: Opened, select: str | Sequence[str | tuple[Any, ...]] | None
) -> list[int]:
    """The indices of the leaves ``select`` picks (all when None), in flatten order.

    Raises:
      KeepaxError: ``select`` matches no leaf.
    """
    key_paths = opened.key_paths
    selectors = _normalize_select(select)
    if selectors is None:
        return sorted(key_paths)
    wanted = sorted(
        i for i, p in key_paths.items() if any(tree.path_matches(p, s) for s in selectors)
    )
    if not wanted:
        top = sorted({str(tree._entry_name(p[0])) for p in key_paths.values() if p})
        raise KeepaxError(
            f"select={select!r} matches no leaf; top-level keys are {top}", path=opened.where
        )
    return wanted


def read_plain(opened: Opened, indices: Sequence[int]) -> dict[int, Any]:
    """Reads the given leaves as NumPy arrays / Python values (no ``like``)."""
    return _read_leaves(opened, indices, {}, None, None)


def decode_value(leaf: ValueLeaf, where: str) -> Any:
    v, kind = leaf.value, leaf.type
    try:
        if kind == "bool" and isinstance(v, bool):
            return v
        if kind == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if kind == "str" and isinstance(v, str):
            return v
        if kind == "float" and isinstance(v, str):
            return tree.decode_float(v)
        if kind == "complex" and isinstance(v, list) and len(v) == 2:
            return complex(tree.decode_float(v[0]), tree.decode_float(v[1]))
    except (ValueError, TypeError, struct.error):
        pass
    raise CorruptCheckpointError(f"invalid {kind} value {v!r:.60}", path=where, leaf=leaf.path)


_Parts = dict[Any, tuple[Any, np.ndarray]]
"""The boxes read of one leaf: per box, its target devices (None: one place) and host buffer."""


def _read_leaves(
    opened: Opened,
    indices: Sequence[int],
    targets: dict[int, _Target | None],
    cast: Any,
    stats: RestoreStats | None,
    per_process: PerProcessChoice = None,
) -> dict[int, Any]:
    """Reads the given leaves (verified) and makes each the value its target asks for."""
    boxes_of: dict[int, dict[Any, Any]] = {}
    for index in indices:
        leaf = opened.manifest.leaves[index]
        if isinstance(leaf, ArrayLeaf) and leaf.type == "perprocess":
            width = leaf.shape[1]
            boxes_of[index] = {((row, 0), (1, width)): None for row in
                               per_process_.rows_wanted(leaf, per_process, opened.where)}
        elif isinstance(leaf, ArrayLeaf):
            boxes_of[index] = _target_boxes(leaf, targets.get(index))
    with vanishing(opened):
        manifest = opened.manifest
        if manifest.tables:
            manifest, table_bytes = tables.resolve(
                opened.storage, opened.name, opened.where, manifest,
                {i: list(b) for i, b in boxes_of.items()},
            )
            if stats is not None:
                stats.table_bytes_read += table_bytes
        files = manifest.files
        needed = {
            c.file for leaf in map(manifest.leaves.__getitem__, boxes_of)
            if isinstance(leaf, ArrayLeaf) for c in leaf.chunks
        }
        format.check_sizes(opened.storage, opened.name, files, needed, opened.where)
        values: dict[int, Any] = {}
        requests: list[ReadRequest] = []
        finishers: list[tuple[int, ArrayLeaf, _Parts]] = []
        arena = sharding.HostArena()
        for index in indices:
            leaf = manifest.leaves[index]
            if isinstance(leaf, ValueLeaf):
                values[index] = decode_value(leaf, opened.where)
                continue
            parts: _Parts = {}
            for box, devices in boxes_of[index].items():
                parts[box] = (devices, arena.empty(box[1], dtypes.dtype_from_name(leaf.dtype)))
                requests.append(ReadRequest(leaf.path, leaf.chunks, box, parts[box][1]))
            finishers.append((index, leaf, parts))
        read = format.read_requests(opened.storage, opened.name, files, requests,
                                    where=opened.where)
    if stats is not None:
        stats.bytes_read += read.bytes_read
        stats.chunks_read += read.chunks_read
        stats.files_opened += read.files_opened
    placer = _Placer()
    pending = [(index, _finish(leaf, targets.get(index), cast, parts, placer))
               if leaf.type != "perprocess" else
               (index, _per_process_value(leaf, targets.get(index), parts, opened.where,
                                          per_process))
               for index, leaf, parts in finishers]
    placer.run()
    for index, make in pending:
        values[index] = make()
    return values


def _target_boxes(leaf: ArrayLeaf, target: _Target | None) -> dict[Any, Any]:
    """The boxes of a leaf this process must read, each with its target devices (None: the
    whole array, to one place)."""
    shape = tuple(leaf.shape)
    if (
        target is not None
        and target.kind == "jax"
        and target.sharding is not None
        and target.committed
        and len(target.sharding.device_set) > 1
    ):
        return sharding.target_boxes(target.sharding, shape)
    return {((0,) * len(shape), shape): None}


class _Placer:
    """Collects host-to-device transfers and makes them in one batched ``jax.device_put``
    (per-array calls cost ~100 us each, which dominates restores of many small arrays)."""

    def __init__(self) -> None:
        self._hosts: list[np.ndarray] = []
        self._dests: list[Any] = []
        self._results: list[jax.Array] = []

    def put(self, host: np.ndarray, dest: Any) -> int:
        """Queues a transfer; ``dest`` None means the default device, uncommitted."""
        self._hosts.append(host)
        self._dests.append(dest)
        return len(self._hosts) - 1

    def run(self) -> None:
        results: list[Any] = [None] * len(self._hosts)
        for committed in (True, False):
            picked = [i for i, d in enumerate(self._dests) if (d is not None) == committed]
            if not picked:
                continue
            hosts = [self._hosts[i] for i in picked]
            if committed:
                placed = jax.device_put(hosts, [self._dests[i] for i in picked])
            else:
                placed = jax.device_put(hosts)
            for i, array in zip(picked, placed):
                results[i] = array
        self._results = results

    def get(self, i: int) -> jax.Array:
        return self._results[i]


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if array.dtype == dtype:
        return array
    out = sharding.aligned_empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")
    return out


def _finish(
    leaf: ArrayLeaf, target: _Target | None, cast: Any, parts: dict[Any, Any], placer: _Placer
) -> Callable[[], Any]:
    """Turns the host buffers read for a leaf into the value the caller asked for.

    Device transfers are queued on ``placer``; the returned function, called after
    ``placer.run()``, gives the value.
    """
    stored = dtypes.dtype_from_name(leaf.dtype)
    final = _final_dtype(stored, target, cast)
    if leaf.type == "prngkey":
        ((_, host),) = parts.values()
        try:
            keys = jax.random.wrap_key_data(host, impl=leaf.impl)
        except (ValueError, TypeError) as e:
            raise CorruptCheckpointError(
                f"stored PRNG key data does not fit implementation {leaf.impl!r}: {e}",
                leaf=leaf.path,
            ) from e
        if target is not None and target.sharding is not None:
            keys = jax.device_put(keys, target.sharding)
        return lambda: keys
    if leaf.type == "bytes":
        ((_, host),) = parts.values()
        data = host.tobytes()
        return lambda: data
    kind = target.kind if target is not None else (
        "npscalar" if leaf.type == "npscalar" else "numpy"
    )
    if kind != "jax":
        ((_, host),) = parts.values()
        host = _cast(host, final)
        value = host[()] if kind == "npscalar" else host
        return lambda: value
    make = _place(leaf, target, final, parts, placer)
    if target is not None and target.weak_type:
        return lambda: _weaken(make())
    return make


def _per_process_value(
    leaf: ArrayLeaf, target: _Target | None, parts: dict[Any, Any], where: str,
    choice: PerProcessChoice,
) -> Callable[[], Any]:
    """The value (or with ``choice="all"``, the list of values) of a per-process leaf."""
    like = target.like if target is not None else None
    rows = [host[0] for _, (_, host) in sorted(parts.items())]
    value = per_process_.decode_rows(rows, like, leaf.path, where, as_list=choice == "all")
    return lambda: value


def _weaken(array: jax.Array) -> jax.Array:
    """Marks an array weakly typed, as its ``like`` leaf was (a Python-scalar-derived value),
    so that a restored state traces exactly like the original and jit does not recompile."""
    from jax._src.lax import lax as lax_internal  # no public API sets weak_type

    return lax_internal._convert_element_type(array, array.dtype, weak_type=True)


def _place(
    leaf: ArrayLeaf, target: _Target | None, final: np.dtype, parts: dict[Any, Any],
    placer: _Placer,
) -> Callable[[], Any]:
    """Queues the host buffers of a leaf for placement on the target's devices."""
    shape = tuple(leaf.shape)
    if target is None or target.sharding is None or not target.committed:
        # Like jnp.asarray, an uncommitted array on the default device (jit may move it).
        ((_, host),) = parts.values()
        i = placer.put(_cast(host, final), None)
        return lambda: placer.get(i)
    if len(parts) == 1 and len(target.sharding.device_set) == 1:
        ((_, host),) = parts.values()
        i = placer.put(_cast(host, final), target.sharding)
        return lambda: placer.get(i)
    slots: list[int] = []
    for devices, host in parts.values():
        host = _cast(host, final)
        slots.extend(placer.put(host, d) for d in devices)
    dest = target.sharding
    return lambda: jax.make_array_from_single_device_arrays(
        shape, dest, [placer.get(i) for i in slots]
    )

