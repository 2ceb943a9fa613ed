"""Restoring a checkpoint: match the stored leaves against a ``like`` tree (or rebuild plain
containers), read the boxes each process needs with ranged, verified reads, cast, and place
the arrays on the requested shardings (one batched ``jax.device_put``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint import container
from keepax._src.checkpoint import per_process as per_process_
from keepax._src.checkpoint.deadline import Deadline
from keepax._src.checkpoint.matching import (
    VALUE_KINDS,
    Target,
    array_as_value,
    final_dtype,
    match_like,
    resolve_cast,
    value_as,
    weaken,
)
from keepax._src.checkpoint.opening import (
    Opened,
    decode_value,
    opened_manifest,
    vanishing,
)
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax._src.checkpoint.templates import Shardings, node_builder, placement_targets
from keepax._src.format import boxes as sharding
from keepax._src.format import dtypes, reading, tables, tree
from keepax._src.format.manifest import ArrayLeaf, Manifest, ValueLeaf
from keepax._src.format.reading import ReadRequest, RestoreStats
from keepax._src.io import Storage
from keepax._src.util import gc_paused
from keepax.errors import CorruptCheckpointError, KeepaxError

__all__ = [
    "RestoreStats", "read_plain", "restore_manifest", "restore_opened",
    "selected_indices",
]


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


Select = str | Sequence[str | tuple[Any, ...]] | None
Transform = Callable[[str, Any], Any]


def restore_manifest(
    storage: Storage, name: str, where: str, manifest: Manifest, like: Any = None, **kwargs: Any
) -> Any:
    """:func:`restore` from a validated manifest whose data files ``storage`` opens under
    ``name`` (how single-file checkpoints share the directory format's reading code);
    keyword arguments as for :func:`restore`.

    Raises:
      CorruptCheckpointError, TreeMismatchError: as :func:`restore`.
    """
    return restore_opened(opened_manifest(storage, name, where, manifest), like, **kwargs)


@gc_paused()
def restore_opened(
    opened: Opened,
    like: Any = None,
    *,
    select: Select = None,
    partial: bool = False,
    dtype: Any = None,
    transform: Transform | None = None,
    shardings: Shardings | None = None,
    types: Sequence[type] = (),
    per_process: PerProcessChoice = None,
    stats: RestoreStats | None = None,
    deadline: Deadline | None = None,
) -> Any:
    """Restores from an opened checkpoint; arguments as for :func:`restore` (``deadline``
    bounds the storage reads)."""
    cast = resolve_cast(dtype)
    wanted = selected_indices(opened, select)
    if like is not None:
        if shardings is not None or types:
            raise KeepaxError("shardings= and types= apply only without like; put shardings "
                              "and container types in like instead", path=opened.where)
        like_leaves, like_def = jax.tree_util.tree_flatten_with_path(like)
        targets, like_order = match_like(opened, wanted, like_leaves, partial, cast)
        values = _read_leaves(opened, sorted(targets), targets, cast, stats, transform,
                              per_process, deadline)
        return jax.tree_util.tree_unflatten(like_def, [values[i] for i in like_order])
    targets = placement_targets(opened, wanted, shardings, cast)
    values = _read_leaves(opened, wanted, targets, cast, stats, transform, per_process,
                          deadline)
    selectors = _normalize_select(select)
    keep = None
    if selectors is not None:
        keep = lambda p: any(tree.path_matches(p, s) for s in selectors)  # noqa: E731
    return tree.rebuild_plain(
        opened.manifest.tree, values.__getitem__, keep=keep,
        make_node=node_builder(types, opened.where) if types else None,
    )


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
        top = sorted({str(tree.entry_name(p[0])) for p in key_paths.values() if p})
        raise KeepaxError(
            f"select={select!r} matches no leaf; top-level keys are {top}", path=opened.where
        )
    return wanted


def read_plain(opened: Opened, indices: Sequence[int]) -> dict[int, Any]:
    """Reads the given leaves as NumPy arrays / Python values (no ``like``)."""
    return _read_leaves(opened, indices, {}, None, None, None)


_ARENA_BLOCK = 64 << 20
_ARENA_MIN_OWN = 16 << 20
"""Restored host buffers under 16 MiB are carved from 64 MiB blocks (:class:`HostArena`).

NumPy asks the kernel for huge pages on allocations of 4 MiB or more, so touching a block
for the first time (while reading into it) takes one fault per 2 MiB; a buffer of its own per
medium array (a bfloat16 [512, 512] is 512 KiB) takes one per 4 KiB page, which cost as much
as the read itself on a state of many such arrays. A block stays alive while any array carved
from it does (its untouched tail is address space only); larger arrays get their own buffer.
"""

_Parts = dict[Any, tuple[Any, np.ndarray]]
"""The boxes read of one leaf: per box, its target devices (None: the whole array, onto its
target's sharding or one place) and host buffer."""


def _read_leaves(
    opened: Opened,
    indices: Sequence[int],
    targets: dict[int, Target | None],
    cast: Any,
    stats: RestoreStats | None,
    transform: Transform | None,
    per_process: PerProcessChoice = None,
    deadline: Deadline | None = None,
) -> dict[int, Any]:
    """Reads the given leaves (verified) and makes each the value its target asks for,
    applying ``transform`` to each as it is made (the storage reads within ``deadline``)."""
    deadline = deadline or Deadline(None, opened.where)
    plan = _ReadPlan(opened, targets, cast, transform is None)
    plan.add(indices, per_process)
    with vanishing(opened):
        manifest, table_bytes = deadline.run("finding the data (chunk tables, file sizes)",
                                             lambda: _resolve_tables(opened, plan.boxes_of))
        if stats is not None:
            stats.table_bytes_read += table_bytes
        values: dict[int, Any] = {}
        for index in indices:
            leaf = manifest.leaves[index]
            if isinstance(leaf, ValueLeaf):
                values[index] = value_as(decode_value(leaf, opened.where), targets.get(index),
                                         leaf.path)
                if transform is not None:
                    values[index] = transform(leaf.path, values[index])
            else:
                plan.request(index, leaf)
        read = deadline.run("reading the data", lambda: reading.read_requests(
            opened.storage, opened.name, manifest.files, plan.requests, where=opened.where))
    if stats is not None:
        stats.bytes_read += read.bytes_read
        stats.chunks_read += read.chunks_read
        stats.files_opened += read.files_opened
    placer = _Placer()
    placed: list[tuple[int, int]] = []  # (leaf index, placer slot) of the plain leaves
    for index, host in plan.plain_hosts:
        target = targets[index] if index in targets else None
        if target is None:
            values[index] = host  # to NumPy, as read
        else:  # as _place does it, without its per-leaf closure
            placed.append((index, placer.put(host, target.sharding if (
                target.sharding is not None and target.committed) else None)))
    pending = [(index, _per_process_value(leaf, targets.get(index), parts, opened.where,
                                          per_process)
                if leaf.type == "perprocess" else
                _finish(leaf, targets.get(index), cast, parts, placer))
               for index, leaf, parts in plan.finishers]
    placer.run()
    for index, slot in placed:
        values[index] = placer.get(slot)
    for index, make in pending:
        values[index] = make()
        if transform is not None:
            values[index] = transform(manifest.leaves[index].path, values[index])
    return values


class _ReadPlan:
    """The boxes a restore reads, their host buffers and read requests.

    The plain leaf (an array read whole, restored as it is read: to NumPy without ``like``,
    or placed once as an unweakened ``jax`` leaf) skips the per-leaf records the others need
    (boxes with devices, a finishing step).
    """

    def __init__(self, opened: Opened, targets: dict[int, Target | None], cast: Any,
                 plain_ok: bool):
        self.opened, self.targets, self.cast, self.plain_ok = opened, targets, cast, plain_ok
        self.boxes_of: dict[int, dict[Any, Any]] = {}
        self.arena = sharding.HostArena(block=_ARENA_BLOCK, min_own=_ARENA_MIN_OWN)
        self.dtype_of = _DtypeNames()
        self.plain: set[int] = set()
        self.requests: list[ReadRequest] = []
        self.plain_hosts: list[tuple[int, np.ndarray]] = []
        self.finishers: list[tuple[int, ArrayLeaf, _Parts]] = []

    def add(self, indices: Sequence[int], per_process: PerProcessChoice) -> None:
        """Decides the boxes of the given leaves (reserving their buffers' bytes)."""
        whole: dict[tuple[int, ...], dict[Any, Any]] = {}  # per shape: one whole box, shared
        # Leaves of one type, shape and dtype with one target (targets are shared) get the
        # same boxes and the same answer from _is_plain: decided once.
        decided: dict[tuple[Any, ...], tuple[dict[Any, Any], bool]] = {}
        sizes: dict[tuple[Any, ...], int] = {}  # how many buffers of each shape and dtype
        leaves, targets, dtype_of = self.opened.manifest.leaves, self.targets, self.dtype_of
        for index in indices:
            leaf = leaves[index]
            if not isinstance(leaf, ArrayLeaf):
                continue
            target = targets[index] if index in targets else None
            if leaf.type == "perprocess":
                boxes = {((row, 0), (1, leaf.shape[1])): None for row in
                         per_process_.rows_wanted(leaf, per_process, self.opened.where)}
                plain = False
            else:
                key = (leaf.type, leaf.shape, leaf.dtype, id(target))
                if key in decided:
                    boxes, plain = decided[key]
                else:
                    boxes = _target_boxes(leaf, target, whole)
                    plain = self.plain_ok and _is_plain(leaf, target, self.cast, boxes,
                                                        dtype_of)
                    decided[key] = boxes, plain
            if plain:
                self.plain.add(index)
            self.boxes_of[index] = boxes
            for box in boxes:
                size = (box[1], leaf.dtype)
                sizes[size] = sizes.get(size, 0) + 1
        for (shape, name), count in sizes.items():
            self.arena.reserve(shape, dtype_of[name], count)  # no block larger than needed

    def request(self, index: int, leaf: ArrayLeaf) -> None:
        """Allocates the host buffers of a leaf (from the resolved manifest) and asks for
        their boxes."""
        dtype = self.dtype_of[leaf.dtype]
        if index in self.plain:
            (box,) = self.boxes_of[index]
            host, view = self.arena.empty_with_bytes(box[1], dtype)
            self.requests.append(ReadRequest(leaf.path, leaf.chunks, box, host, view))
            self.plain_hosts.append((index, host))
            return
        parts: _Parts = {}
        for box, devices in self.boxes_of[index].items():
            host, view = self.arena.empty_with_bytes(box[1], dtype)
            parts[box] = (devices, host)
            self.requests.append(ReadRequest(leaf.path, leaf.chunks, box, host, view))
        self.finishers.append((index, leaf, parts))


def _is_plain(
    leaf: ArrayLeaf, target: Target | None, cast: Any, boxes: dict[Any, Any],
    dtype_of: _DtypeNames,
) -> bool:
    """Whether a leaf is read whole into one host buffer that becomes the restored value as
    it is (no ``like``: a NumPy array) or placed once (an unweakened ``jax`` target on one
    sharding or the default device); :func:`_finish` makes any other."""
    if leaf.type not in ("jax", "numpy", "npscalar") or len(boxes) != 1 or (
            next(iter(boxes.values())) is not None):
        return False
    if cast is not None:
        stored = dtype_of[leaf.dtype]
        if final_dtype(stored, target, cast) != stored:
            return False
    if target is None:
        return leaf.type != "npscalar"
    return target.kind == "jax" and not target.weak_type


class _DtypeNames(dict[str, np.dtype]):
    """Manifest dtype names to dtypes, each looked up once per restore."""

    def __missing__(self, name: str) -> np.dtype:
        dtype = self[name] = dtypes.dtype_from_name(name)
        return dtype


def _resolve_tables(opened: Opened, boxes_of: dict[int, dict[Any, Any]]) -> tuple[Manifest, int]:
    """The manifest with the chunks of the leaves to read (from the chunk tables, if any),
    its needed data files' sizes checked; and the table bytes read."""
    manifest, table_bytes = opened.manifest, 0
    if manifest.tables:
        manifest, table_bytes = tables.resolve(
            opened.storage, opened.name, opened.where, manifest,
            {i: list(b) for i, b in boxes_of.items()},
        )
    needed = {
        c.file for leaf in map(manifest.leaves.__getitem__, boxes_of)
        if isinstance(leaf, ArrayLeaf) for c in leaf.chunks
    }
    reading.check_sizes(opened.storage, opened.name, manifest.files, needed, opened.where)
    return manifest, table_bytes


def _target_boxes(
    leaf: ArrayLeaf, target: Target | None, whole: dict[tuple[int, ...], dict[Any, Any]],
) -> dict[Any, Any]:
    """The boxes of a leaf this process must read, each with its target devices (None: the
    whole array, placed with one transfer on its target's sharding).

    A sharding whose devices all belong to this process gets the whole array, read once:
    JAX cuts it into the shards itself (zero-copy views on CPU), at a fraction of the cost of
    one transfer per device and one ``make_array_from_single_device_arrays`` per leaf.
    ``whole``: per shape, the whole-array boxes handed out (the same one for equal shapes).
    """
    shape = tuple(leaf.shape)
    if (
        target is not None
        and target.committed
        and target.kind == "jax"
        and target.sharding is not None
        and len(target.sharding.device_set) > 1
        and not target.sharding.is_fully_addressable
    ):
        return sharding.target_boxes(target.sharding, shape)
    boxes = whole.get(shape)
    if boxes is None:
        boxes = whole[shape] = {((0,) * len(shape), shape): None}
    return boxes


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
        _fast_puts(self._hosts, self._dests, results)
        for committed in (True, False):
            picked = [i for i, d in enumerate(self._dests)
                      if (d is not None) == committed and results[i] is None]
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


def _fast_puts(hosts: list[np.ndarray], dests: list[Any], results: list[Any]) -> None:
    """Places the arrays bound for one device (the default one when ``dests[i]`` is None)
    with JAX's own per-array transfer (``jax.device_put`` ends in the same call), skipping
    the ~20 us of Python ``jax.device_put`` spends per array. Fills ``results`` where it
    can; ``jax.device_put`` places the rest (other shardings and dtypes, or all of them in
    a JAX whose internals differ)."""
    try:
        from jax._src import core  # noqa: PLC0415
        from jax._src import dtypes as jax_dtypes  # noqa: PLC0415
        from jax._src.interpreters import pxla  # noqa: PLC0415
        from jax._src.lib import xla_client as xc  # noqa: PLC0415

        put = xc.batched_device_put
        default = jax.sharding.SingleDeviceSharding(pxla.get_default_device())
    except (ImportError, AttributeError):
        return
    avals: dict[tuple[Any, ...], Any] = {}
    canonical: dict[np.dtype, bool] = {}
    # Per destination (by id: the dests outlive this call), its sharding and devices when it
    # is one device in its default memory, else None.
    plain: dict[int, tuple[Any, list[Any]] | None] = {
        id(None): (default, list(default.device_set))}
    for i, (host, dest) in enumerate(zip(hosts, dests)):
        if id(dest) in plain:
            found = plain[id(dest)]
        else:
            found = plain[id(dest)] = (dest, list(dest.device_set)) if (
                type(dest) is jax.sharding.SingleDeviceSharding
                and dest == jax.sharding.SingleDeviceSharding(next(iter(dest.device_set)))
            ) else None
        if found is None or type(host) is not np.ndarray:
            continue
        dtype = host.dtype
        if dtype not in canonical:  # float64 without x64, float0: jax.device_put converts
            canonical[dtype] = jax_dtypes.canonicalize_dtype(dtype) == dtype and (
                dtype != jax_dtypes.float0)
        if not canonical[dtype]:
            continue
        key = (host.shape, dtype)
        aval = avals.get(key)
        if aval is None:
            aval = avals[key] = core.ShapedArray(host.shape, dtype)
        try:
            placed = put(aval, found[0], [host], found[1], dest is not None)
        except (TypeError, ValueError, AttributeError):
            return  # a JAX whose internals differ: jax.device_put does the rest
        if not (isinstance(placed, jax.Array) and placed.shape == host.shape):
            return
        results[i] = placed


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if array.dtype == dtype:
        return array
    out = sharding.aligned_empty(array.shape, dtype)
    np.copyto(out, array, casting="unsafe")
    return out


def _finish(
    leaf: ArrayLeaf, target: Target | None, cast: Any, parts: dict[Any, Any], placer: _Placer
) -> Callable[[], Any]:
    """Turns the host buffers read for a leaf into the value the caller asked for.

    Device transfers are queued on ``placer``; the returned function, called after
    ``placer.run()``, gives the value.
    """
    stored = dtypes.dtype_from_name(leaf.dtype)
    final = final_dtype(stored, target, cast)
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
    if kind in VALUE_KINDS:
        ((_, host),) = parts.values()
        scalar = array_as_value(host, kind, leaf.path)
        return lambda: scalar
    if kind != "jax":
        ((_, host),) = parts.values()
        host = _cast(host, final)
        value = host[()] if kind == "npscalar" else host
        return lambda: value
    make = _place(leaf, target, final, parts, placer)
    if target is not None and target.weak_type:
        return lambda: weaken(make())
    return make


def _per_process_value(
    leaf: ArrayLeaf, target: Target | None, parts: dict[Any, Any], where: str,
    choice: PerProcessChoice,
) -> Callable[[], Any]:
    """The value (or with ``choice="all"``, the list of values) of a per-process leaf."""
    like = target.like if target is not None else None
    rows = [host[0] for _, (_, host) in sorted(parts.items())]
    value = per_process_.decode_rows(rows, like, leaf.path, where, choice == "all", _load_bytes)
    return lambda: value


def _load_bytes(data: bytes, like: Any, where: str) -> Any:
    """The tree in a single-file container's bytes (a per-process copy), onto ``like``."""
    storage, name, manifest = container.parse_bytes(data, where)
    return restore_manifest(storage, name, where, manifest, like)


def _place(
    leaf: ArrayLeaf, target: Target | None, final: np.dtype, parts: dict[Any, Any],
    placer: _Placer,
) -> Callable[[], Any]:
    """Queues the host buffers of a leaf for placement on the target's devices."""
    shape = tuple(leaf.shape)
    if target is None or target.sharding is None or not target.committed:
        # Like jnp.asarray, an uncommitted array on the default device (jit may move it).
        ((_, host),) = parts.values()
        i = placer.put(_cast(host, final), None)
        return lambda: placer.get(i)
    ((devices, host), *more) = parts.values()
    if not more and devices is None:
        # The whole array, read once (see _target_boxes): one transfer onto the sharding.
        i = placer.put(_cast(host, final), target.sharding)
        return lambda: placer.get(i)
    slots: list[int] = []
    dest = target.sharding
    for devices, host in parts.values():
        host = _cast(host, final)
        # Each device's piece lands in the sharding's memory kind (pinned_host, device, ...).
        slots.extend(
            placer.put(host, jax.sharding.SingleDeviceSharding(d, memory_kind=dest.memory_kind))
            for d in devices
        )
    return lambda: jax.make_array_from_single_device_arrays(
        shape, dest, [placer.get(i) for i in slots]
    )

