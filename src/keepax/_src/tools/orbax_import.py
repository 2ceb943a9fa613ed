"""Import Orbax checkpoints: one checkpoint, or a whole Orbax ``CheckpointManager`` run.

Sources:

- a checkpoint written by ``StandardCheckpointer`` / ``PyTreeCheckpointer`` (OCDBT or not, zstd
  or not): its tree becomes one keepax checkpoint;
- one step of an Orbax ``CheckpointManager`` (a directory of named items): a keepax checkpoint
  holding ``{item: tree}`` (the tree itself when the only item is ``default``);
- a whole Orbax ``CheckpointManager`` directory: every step (or the chosen ones) becomes a step
  of a keepax manager directory, with the same step numbers, the items as above, and the
  metrics (Orbax's ``metrics`` item); values that are not finite numbers are kept in the
  step's metadata under ``"orbax"``.

Values are read through Orbax's own restore (numpy arrays, bit-exact), a few leaves at a time
(a batch of at most ``batch_bytes``, or one larger leaf), while the keepax checkpoint is being
written, one data file after the other: memory holds the leaves of one batch (or one leaf) and
at most one chunk (64 MiB) of the leaf before, rather than the state. Dtypes come as Orbax
stores them (bfloat16, int4, float8, ...; Orbax stores PRNG keys as their ``uint32`` key data).
The saved named shardings are recorded in the keepax manifest.

Orbax is an optional extra: ``pip install keepax[orbax]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keepax._src import checkpoint
from keepax._src.commit import protocol
from keepax._src.format import datafiles
from keepax._src.io import open_root
from keepax._src.manager.foreign import (
    ORBAX_STEP_RE,
    ORBAX_TMP_TAG,
    looks_like_orbax_dir,
    orbax_directory_error,
)
from keepax._src.tools import _common, listing
from keepax.errors import CheckpointExistsError, KeepaxError

__all__ = ["import_orbax", "ImportResult", "looks_like_orbax_dir", "orbax_directory_error",
           "add_import_orbax_parser", "run_import_orbax"]

_METRICS_ITEM = "metrics"
_BATCH_BYTES = 16 << 20
_TRIM_BYTES = 1 << 20


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise KeepaxError(
            "importing Orbax checkpoints needs orbax-checkpoint: pip install keepax[orbax]"
        ) from e
    return ocp


# ---------------------------------------------------------------------------------------------
# Reading one Orbax pytree item.


@dataclasses.dataclass
class _Leaf:
    """An array leaf of an Orbax pytree item: where it is and what it is."""

    item: int
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: dict[str, Any] | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Item:
    """One Orbax pytree item (a directory with ``_METADATA``): its structure and leaves."""

    def __init__(self, ocp: Any, directory: str) -> None:
        import jax  # noqa: PLC0415

        self.ocp, self.directory = ocp, directory
        self.checkpointer = ocp.PyTreeCheckpointer()
        metadata = self.checkpointer.metadata(directory)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise KeepaxError("Orbax finds no tree metadata in this checkpoint (written by an "
                              "Orbax too old to record it?); nothing imported", path=directory)
        self.metas, self.treedef = jax.tree_util.tree_flatten(tree)

    def is_array(self, i: int) -> bool:
        return type(self.metas[i]).__name__ == "ArrayMetadata"

    @property
    def nbytes(self) -> int:
        """Bytes of the item's arrays, from its metadata."""
        return sum(math.prod(int(d) for d in m.shape) * np.dtype(m.dtype).itemsize
                   for i, m in enumerate(self.metas) if self.is_array(i))

    def restore(self, indices: Sequence[int]) -> dict[int, Any]:
        """Restores the given leaves (arrays as NumPy) with Orbax; the rest are skipped."""
        wanted = set(indices)
        placeholder = self.ocp.PLACEHOLDER
        import jax  # noqa: PLC0415

        item = jax.tree_util.tree_unflatten(
            self.treedef, [0 if i in wanted else placeholder for i in range(len(self.metas))])
        args = jax.tree_util.tree_unflatten(self.treedef, [
            (self.ocp.RestoreArgs(restore_type=np.ndarray) if self.is_array(i)
             else self.ocp.RestoreArgs()) if i in wanted else placeholder
            for i in range(len(self.metas))
        ])
        restored = self.checkpointer.restore(
            self.directory, args=self.ocp.args.PyTreeRestore(item=item, restore_args=args))
        values = jax.tree_util.tree_leaves(restored, is_leaf=lambda x: x is placeholder)
        if len(values) != len(self.metas):
            raise KeepaxError(f"Orbax restored {len(values)} leaves where its metadata lists "
                              f"{len(self.metas)}", path=self.directory)
        return {i: values[i] for i in indices}


def _sharding(meta: Any) -> dict[str, Any] | None:
    """A saved Orbax NamedSharding as keepax describes shardings; None for others."""
    sharding: Any = getattr(meta, "sharding", None)
    if type(sharding).__name__ != "NamedShardingMetadata":
        return None
    try:
        names = list(sharding.axis_names)
        mesh = {str(n): int(s) for n, s in zip(names, np.asarray(sharding.shape).tolist())}
        spec = [list(p) if isinstance(p, tuple) else p for p in sharding.partition_spec]
    except (AttributeError, TypeError, ValueError):
        return None
    return {"kind": "named", "mesh": mesh, "spec": spec}


def _plain_value(meta: Any, value: Any) -> Any:
    """A scalar or string leaf as keepax stores it (Python scalars stay Python scalars)."""
    if type(meta).__name__ == "ScalarMetadata" and isinstance(value, np.generic | np.ndarray):
        return np.asarray(value).item()
    return value


# ---------------------------------------------------------------------------------------------
# Writing a keepax checkpoint while reading Orbax leaves.


def _release_memory() -> None:
    """Returns freed heap memory to the system (glibc keeps freed blocks of up to 32 MiB in
    its arenas, one per thread, which would hold the whole state over an import)."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class _Loader:
    """Restores Orbax leaves for a writer that takes the chunks in their planned order.

    Consecutive leaves of one item are restored together (a batch of at most ``batch_bytes``,
    or one larger leaf) and forgotten once their last chunk was handed out. The last chunk of
    a leaf cut into several chunks is handed out as a copy, so that the leaf itself is freed
    then: while the next batch is restored, the writer holds at most that one chunk
    (``CHUNK_BYTES``, 64 MiB) of what came before.
    """

    def __init__(self, items: list[_Item], leaves: list[_Leaf], sequence: Sequence[int],
                 batch_bytes: int, report: Callable[[int], None]) -> None:
        self.items, self.leaves, self.batch_bytes, self.report = items, leaves, batch_bytes, report
        self.left: dict[int, int] = {}  # leaf -> chunks not yet handed out
        for k in sequence:
            self.left[k] = self.left.get(k, 0) + 1
        self.order = list(self.left)  # leaves in the order their first chunk is written
        self.position = {k: i for i, k in enumerate(self.order)}
        self.cache: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()  # one caller at a time (a multi-process save's threads)
        self.freed = 0

    def _batch(self, first: int) -> list[int]:
        out, size = [first], self.leaves[first].nbytes
        for j in itertools.islice(self.order, self.position[first] + 1, None):
            nbytes = self.leaves[j].nbytes
            if self.leaves[j].item != self.leaves[first].item or size + nbytes > self.batch_bytes:
                break
            if j not in self.cache:
                out.append(j)
                size += nbytes
        return out

    def chunk(self, k: int, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        with self.lock:
            array = self.cache.get(k)
            if array is None:
                if self.freed >= _TRIM_BYTES:
                    _release_memory()
                    self.freed = 0
                batch = self._batch(k)
                got = self.items[self.leaves[k].item].restore(
                    [self.leaves[j].index for j in batch])
                for j in batch:
                    self.cache[j] = np.asarray(got[self.leaves[j].index])
                del got
                array = self.cache[k]
            leaf = self.leaves[k]
            if array.shape != leaf.shape or array.dtype != leaf.dtype:
                raise KeepaxError(f"Orbax restored {array.dtype}{list(array.shape)} where its "
                                  f"metadata says {leaf.dtype}{list(leaf.shape)}",
                                  path=self.items[leaf.item].directory)
            self.left[k] -= 1
            box = array[tuple(slice(s, s + n) for s, n in zip(start, shape))]
            if self.left[k] <= 0:
                del self.cache[k]
                self.freed += leaf.nbytes
                if box.shape != array.shape:
                    box = box.copy()  # frees the whole leaf now, not when the next is read
            del array
        self.report(box.nbytes)
        return box


def _file_groups(sources: Sequence[Any]) -> list[list[Any]]:
    """The chunks cut into at most 4 runs of consecutive chunks of about equal size (a data
    file each, as a save writes them), so that writing one file after the other reads the
    leaves in order."""
    total = sum(s.nbytes for s in sources)
    count = max(1, min(4, len(sources), math.ceil(total / datafiles.CHUNK_BYTES)))
    groups: list[list[Any]] = [[] for _ in range(count)]
    before = 0
    for source in sources:
        groups[min(count - 1, before * count // max(1, total))].append(source)
        before += source.nbytes
    return [g for g in groups if g]


def _write_sequentially(prepared: Any, sources: list[Any]) -> None:
    """Writes a prepared single-process save one data file after the other, on this thread
    (``write_prepared`` writes files in parallel, each thread holding the leaf it writes)."""
    storage = prepared.storage
    with protocol.staged(storage, prepared.name, prepared.where,
                         replace=prepared.overwrite) as staging:
        files: list[Any] = []
        chunks: dict[int, list[Any]] = {}
        for g, group in enumerate(_file_groups(sources)):
            got, placed = datafiles.write_data_files(storage, staging.path, group,
                                                     prefix=f"p00000-{g}", max_files=1)
            for leaf, pairs in placed.items():
                chunks.setdefault(leaf, []).extend(
                    (s, dataclasses.replace(c, file=c.file + len(files))) for s, c in pairs)
            files += got
        if files:
            storage.sync_dir(f"{staging.path}/data")
        manifest = prepared.plan.manifest(files, chunks, prepared.metadata, created=time.time())
        protocol.commit(staging, manifest)


def _write(path: str, items: dict[str, _Item], unwrap: bool, extra: dict[str, Any],
           metadata: dict[str, Any], overwrite: bool, batch_bytes: int,
           storage_options: dict[str, Any] | None, report: Callable[[int], None]) -> int:
    """Writes one keepax checkpoint from Orbax items (and ``extra`` plain values); returns
    the bytes of array data. ``report`` is called with the bytes of each chunk read."""
    import jax  # noqa: PLC0415

    item_list = list(items.values())
    leaves: list[_Leaf] = []
    placeholders: dict[int, int] = {}  # id(placeholder) -> index into leaves
    trees: dict[str, Any] = {}
    keep_alive = []
    for n, (name, item) in enumerate(items.items()):
        small = [i for i in range(len(item.metas)) if not item.is_array(i)]
        values = item.restore(small) if small else {}
        flat = []
        for i, meta in enumerate(item.metas):
            if i in values:
                flat.append(_plain_value(meta, values[i]))
                continue
            dtype = np.dtype(meta.dtype)
            shape = tuple(int(d) for d in meta.shape)
            holder = np.broadcast_to(np.zeros((), dtype), shape)  # no memory: a stand-in
            keep_alive.append(holder)
            placeholders[id(holder)] = len(leaves)
            leaves.append(_Leaf(n, i, shape, dtype, _sharding(meta)))
            flat.append(holder)
        trees[name] = jax.tree_util.tree_unflatten(item.treedef, flat)
    tree = next(iter(trees.values())) if unwrap else {**trees, **extra}
    prepared = checkpoint.prepare_save(path, tree, metadata=metadata, overwrite=overwrite,
                                       storage_options=storage_options)
    plan = prepared.plan
    by_index = {k: placeholders[id(v)] for k, v in enumerate(plan.structure.leaves)
                if id(v) in placeholders}
    for k, (_, _, _, fields) in plan.arrays.items():
        if k in by_index and leaves[by_index[k]].sharding:
            fields["sharding"] = leaves[by_index[k]].sharding
    groups = _file_groups(plan.sources)
    sequence = [by_index[s.leaf] for group in groups for s in group]
    loader = _Loader(item_list, leaves, sequence, batch_bytes, report)

    def lazy(source: Any) -> Callable[[], np.ndarray]:
        leaf = by_index[source.leaf]
        return lambda: loader.chunk(leaf, source.start, source.shape)

    sources = [dataclasses.replace(s, data=lazy(s)) for s in plan.sources]
    if prepared.coordinator is None and prepared.store is None:
        _write_sequentially(prepared, sources)
    else:  # a multi-process run: written as any save (its threads take turns in the loader)
        checkpoint.write_prepared(prepared, sources)
    return sum(leaf.nbytes for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# Orbax layouts.


def _is_pytree(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "_METADATA"))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _step_items(ocp: Any, directory: str) -> tuple[dict[str, _Item], dict[str, Any]]:
    """The pytree items and the JSON items of one Orbax manager step."""
    pytrees: dict[str, _Item] = {}
    plain: dict[str, Any] = {}
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if not os.path.isdir(sub) or name == _METRICS_ITEM or ORBAX_TMP_TAG in name:
            continue
        if _is_pytree(sub):
            pytrees[name] = _Item(ocp, sub)
        elif os.path.isfile(os.path.join(sub, "metadata")):
            plain[name] = _read_json(os.path.join(sub, "metadata"))
        else:
            raise KeepaxError(
                f"item {name!r} is neither a pytree (no _METADATA) nor a JSON item; keepax "
                "imports items written by StandardSave/PyTreeSave and JsonSave",
                path=directory,
            )
    if not pytrees and not plain:
        raise KeepaxError("no Orbax items found in this step", path=directory)
    return pytrees, plain


def _metrics(directory: str) -> dict[str, Any]:
    metrics = _read_json(os.path.join(directory, _METRICS_ITEM, "metrics")) or {}
    meta = _read_json(os.path.join(directory, "_CHECKPOINT_METADATA")) or {}
    if isinstance(meta.get("metrics"), dict):
        metrics = {**meta["metrics"], **(metrics if isinstance(metrics, dict) else {})}
    return metrics if isinstance(metrics, dict) else {}


def _orbax_steps(directory: str) -> dict[int, str]:
    steps: dict[int, str] = {}
    for name in os.listdir(directory):
        match = ORBAX_STEP_RE.match(name)
        full = os.path.join(directory, name)
        if match and ORBAX_TMP_TAG not in name and os.path.isdir(full) and not _is_pytree(full):
            steps.setdefault(int(match.group(1)), full)
    return steps


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What :func:`import_orbax` wrote.

    Attributes:
      kind: ``checkpoint`` (one keepax checkpoint) or ``manager`` (a manager directory).
      paths: The keepax checkpoints written.
      steps: The steps imported (manager imports).
      skipped: Steps the destination already held (an earlier, interrupted import).
      best_step: With ``best=``: the best step by that metric.
      nbytes: Bytes of array data imported.
    """

    kind: str
    paths: tuple[str, ...]
    steps: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    best_step: int | None = None
    nbytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the result."""
        return {"kind": self.kind, "paths": list(self.paths), "steps": list(self.steps),
                "skipped": list(self.skipped), "best_step": self.best_step,
                "nbytes": self.nbytes}


def _split_metrics(raw: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _remote_source_error(src: str) -> KeepaxError:
    """Why an Orbax checkpoint at a URL is not imported, and what to do instead."""
    if src.split("://", 1)[0] in ("s3", "s3a"):
        why = ("orbax-checkpoint 0.12 cannot read s3:// checkpoints (it opens their arrays "
               "with tensorstore's local file driver, and cannot write them either)")
        how = f"`aws s3 cp --recursive {src} LOCAL_DIR`"
    else:
        why, how = "keepax imports Orbax checkpoints from local disk only", "rclone or gsutil"
    return KeepaxError(f"{why}; copy the Orbax checkpoint to local disk first ({how}), then run "
                       "`keepax import-orbax LOCAL_DIR DST` (DST may be a URL)", path=src)


def import_orbax(
    src: str,
    dst: str,
    *,
    steps: Sequence[int] | None = None,
    best: tuple[str, str] | None = None,
    overwrite: bool = False,
    batch_bytes: int = _BATCH_BYTES,
    progress: Callable[[int, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ImportResult:
    """Imports an Orbax checkpoint or Orbax ``CheckpointManager`` directory (module docs).

    Args:
      src: A local Orbax checkpoint, manager step, or manager directory (not a URL: Orbax
        0.12 cannot read s3://, so copy such a checkpoint to local disk first).
      dst: The keepax checkpoint to write (for a checkpoint or a step), or the keepax manager
        directory to fill (for a manager directory); any path or URL keepax saves to.
      steps: Manager directories: import only these steps.
      best: ``(metric, mode)``, e.g. ``("loss", "min")``: report the best step (Orbax keeps
        its ``best_fn`` in code, not on disk) and record it in each step's metadata.
      overwrite: Replace existing keepax checkpoints at the destination.
      batch_bytes: Most bytes of small leaves restored by one Orbax call.
      progress: Called with (bytes of arrays read, bytes to import) as the import goes.
      storage_options: For a destination URL, as for :func:`keepax.save`.

    Returns:
      What was written.

    Raises:
      KeepaxError: Orbax is not installed (the message says ``pip install keepax[orbax]``),
        ``src`` is a URL (copy it to local disk first) or not an Orbax checkpoint, or an item
        is of a kind keepax cannot import.
      CheckpointExistsError: a destination checkpoint exists and ``overwrite`` is false.
    """
    src = os.fspath(src).removeprefix("file://")
    if "://" in src:
        raise _remote_source_error(src)
    ocp = _orbax()
    if not os.path.isdir(src):
        raise KeepaxError("not a local directory; import Orbax checkpoints from local disk",
                          path=src)
    src = os.path.abspath(src)  # Orbax reads no metadata through a relative path
    info = {"source": os.path.abspath(src)}
    if _is_pytree(src):
        item = _Item(ocp, src)
        n = _write(dst, {"default": item}, True, {}, {"orbax": info}, overwrite, batch_bytes,
                   storage_options, _Counter(progress, item.nbytes))
        return ImportResult("checkpoint", (dst,), nbytes=n)
    if os.path.isfile(os.path.join(src, "_CHECKPOINT_METADATA")):
        return _import_step_dir(ocp, src, dst, info, overwrite, batch_bytes, progress,
                                storage_options)
    found = _orbax_steps(src)
    if not found:
        raise KeepaxError("not an Orbax checkpoint or CheckpointManager directory (no _METADATA, "
                          "_CHECKPOINT_METADATA or step directories)", path=src)
    return _import_manager(ocp, src, dst, found, steps, best, overwrite, batch_bytes, progress,
                           storage_options)


class _Counter:
    """Adds up the bytes read for a ``progress(done, total)`` callback."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def _import_step_dir(ocp: Any, src: str, dst: str, info: dict[str, Any], overwrite: bool,
                     batch_bytes: int, progress: Callable[[int, int], None] | None,
                     storage_options: dict[str, Any] | None) -> ImportResult:
    pytrees, plain = _step_items(ocp, src)
    unwrap = list(pytrees) == ["default"] and not plain
    raw = _metrics(src)
    meta = {"orbax": {**info, "items": sorted([*pytrees, *plain]), "metrics": raw}}
    counter = _Counter(progress, sum(item.nbytes for item in pytrees.values()))
    n = _write(dst, pytrees, unwrap, plain, meta, overwrite, batch_bytes, storage_options,
               counter)
    return ImportResult("checkpoint", (dst,), nbytes=n)


def _import_manager(ocp: Any, src: str, dst: str, found: dict[int, str],
                    steps: Sequence[int] | None, best: tuple[str, str] | None, overwrite: bool,
                    batch_bytes: int, progress: Callable[[int, int], None] | None,
                    storage_options: dict[str, Any] | None) -> ImportResult:
    from keepax._src.manager import index as keepax_index  # noqa: PLC0415 - higher layer
    from keepax._src.manager import manager as keepax_manager  # noqa: PLC0415 - higher layer
    from keepax._src.manager.naming import DEFAULT_TEMPLATE, NameTemplate  # noqa: PLC0415

    wanted = sorted(found) if steps is None else sorted(set(steps))
    missing = [s for s in wanted if s not in found]
    if missing:
        raise KeepaxError(f"step(s) {missing} are not in this Orbax directory; it holds "
                          f"{sorted(found)}", path=src)
    names = NameTemplate(DEFAULT_TEMPLATE)
    written, skipped, nbytes = [], [], 0
    metrics_of: dict[int, dict[str, float]] = {}
    with keepax_manager.CheckpointManager(dst, storage_options=storage_options,
                                          async_save=False) as manager:
        held = set(manager.all_steps())
        storage = open_root(dst, storage_options)
        todo: dict[int, tuple[dict[str, _Item], dict[str, Any]]] = {}
        for step in wanted:
            metrics_of[step] = _split_metrics(_metrics(found[step]))
            if step in held and not overwrite:
                skipped.append(step)
                continue
            name = names.format(step, {})
            if step not in held and storage.exists(name) and not overwrite:
                raise CheckpointExistsError("the step's name is taken by something else",
                                            path=storage.display(name), step=step)
            todo[step] = _step_items(ocp, found[step])
        counter = _Counter(progress, sum(item.nbytes for pytrees, _ in todo.values()
                                         for item in pytrees.values()))
        for step, (pytrees, plain) in todo.items():
            raw = _metrics(found[step])
            name = names.format(step, {})
            unwrap = list(pytrees) == ["default"] and not plain
            facts = {"version": 1, "step": step, "temporary": False, "time": _time(found[step]),
                     "started": _time(found[step]), "metrics": metrics_of[step],
                     "placeholders": {}, "iterators": []}
            user = {"orbax": {"source": found[step], "items": sorted([*pytrees, *plain]),
                              "metrics": raw, **({"best": list(best)} if best else {})}}
            metadata = {keepax_index.MANAGER_KEY: facts, keepax_index.USER_KEY: user}
            nbytes += _write(storage.display(name), pytrees, unwrap, plain, metadata,
                             overwrite and step in held, batch_bytes, storage_options, counter)
            written.append(storage.display(name))
        manager.reload()
        imported = set(manager.all_steps())
    lost = [s for s in wanted if s not in imported]
    if lost:
        raise KeepaxError(f"imported step(s) {lost} are not readable as manager steps (a keepax "
                          "bug: please report it)", path=dst)
    return ImportResult("manager", tuple(written), tuple(s for s in wanted if s not in skipped),
                        tuple(skipped), _best(metrics_of, best), nbytes)


def _time(directory: str) -> float:
    meta = _read_json(os.path.join(directory, "_CHECKPOINT_METADATA")) or {}
    stamp = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    return stamp / 1e9 if isinstance(stamp, int) else os.path.getmtime(directory)


def _best(metrics: dict[int, dict[str, float]], best: tuple[str, str] | None) -> int | None:
    if best is None:
        return None
    metric, mode = best
    sign = 1.0 if mode == "min" else -1.0
    ranked = [(sign * m[metric], -s) for s, m in metrics.items() if metric in m]
    return -min(ranked)[1] if ranked else None


# ---------------------------------------------------------------------------------------------
# Command line.


def add_import_orbax_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax import-orbax SRC DST [--step N ...] [--best METRIC:MODE]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import-orbax", help="import an Orbax checkpoint or CheckpointManager directory",
        description="Import an Orbax checkpoint (into a keepax checkpoint) or a whole Orbax "
                    "CheckpointManager directory (into a keepax manager directory with the "
                    "same steps and metrics). Needs pip install keepax[orbax].")
    parser.add_argument("src", help="local Orbax checkpoint or manager directory (copy one "
                                    "on S3 to local disk first: Orbax cannot read s3://)")
    parser.add_argument("dst", help="keepax checkpoint, or manager directory (path or URL)")
    parser.add_argument("--step", type=int, action="append", dest="steps", metavar="N",
                        help="import only step N (repeatable)")
    parser.add_argument("--best", metavar="METRIC[:min|max]",
                        help="report (and record) the best step by this metric")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing keepax checkpoints")
    _common.add_common(parser)
    parser.set_defaults(run=run_import_orbax)
    return parser


def run_import_orbax(args: argparse.Namespace) -> int:
    """Runs ``keepax import-orbax``; returns the exit status (0 done, 2 error)."""

    def body() -> int:
        best = listing.parse_best(args.best)
        with _common.Progress("import", quiet=args.quiet) as bar:
            result = import_orbax(args.src, args.dst, steps=args.steps, best=best,
                                  overwrite=args.overwrite, progress=bar,
                                  storage_options=_common.storage_options(args))
        if args.json:
            _common.print_json(result.to_json())
            return 0
        for path in result.paths:
            print(f"imported  {path}")
        if result.skipped:
            print(f"already there: steps {list(result.skipped)}")
        if result.best_step is not None:
            print(f"best step {result.best_step}")
        print(f"{len(result.paths)} checkpoint{'s' if len(result.paths) != 1 else ''}, "
              f"{_common.format_size(result.nbytes)} of arrays")
        return 0

    return _common.run_cli("import-orbax", body)
