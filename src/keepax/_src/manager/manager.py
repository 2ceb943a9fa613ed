"""CheckpointManager: many steps of one run in one directory.

A *step* is one keepax checkpoint (a directory written by :func:`keepax.save`) under the
manager's directory, named from a template. Its tree is the user's state; the manager's own
facts about it (step number, temporary or not, metrics, clock time, placeholders) are stored
in the checkpoint's manifest metadata under :data:`MANAGER_KEY`, next to the user's metadata
under ``"user"``. So the step number is read from the manifest, never parsed from a name, and
the manager's view of the directory survives a restart.

Decisions are pure and live in :mod:`keepax.policies` (when to save: ``policies.decide``;
what to keep: ``policies.plan``). This module gathers the facts, asks, and acts: the write
path is :meth:`CheckpointManager._write` and the delete path :meth:`CheckpointManager._discard`.

Saves are asynchronous by default: ``_write`` captures the state in the caller's thread
(iterator states, Python values; arrays staged by :mod:`keepax._src.async_engine.engine`) and the
engine's writer thread writes and commits it, then calls :meth:`CheckpointManager._committed`
to record the step and apply retention. Decisions made while saves are in flight see those
steps as held; queries about steps (``all_steps``, ``restore``, ...) first wait for them.

Deletions are two-phase: the step is first hidden (renamed to a ``.keepax-`` trash name, or
its commit marker removed where storage cannot rename), only after the step that justifies it
is committed (on the writer thread, right after that commit); its files are then removed on a
background thread. Errors of background writes and deletions are raised by the next
``save``/``wait_until_finished``/``check_for_errors``/``close``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import numbers
import operator
import os
import signal
import threading
import time
import types
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from keepax import policies
from keepax._src import checkpoint
from keepax._src.async_engine import engine as async_engine
from keepax._src.commit import coordination
from keepax._src.format.datafiles import RestoreStats
from keepax._src.format.manifest import COMMIT_FILE
from keepax._src.io import LocalStorage, Storage, is_hidden_name, open_root
from keepax._src.io.lock import LOCK_NAME, DirectoryLock
from keepax._src.manager.naming import DEFAULT_TEMPLATE, NameTemplate
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    KeepaxError,
    KeepaxWarning,
    PolicyError,
    TreeMismatchError,
    UnsupportedLeafError,
)

__all__ = ["CheckpointManager", "StepInfo", "MANAGER_KEY"]

MANAGER_KEY = "keepax.manager"
"""The manifest metadata key holding the manager's facts about a step."""

USER_KEY = "user"
"""The manifest metadata key holding the user's metadata of a step."""

_SCHEMA = 1
_DEFAULT_GRACE = 600.0


# ---------------------------------------------------------------------------------------------
# What the manager knows about a step.


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One step held by a :class:`CheckpointManager` (what :meth:`~CheckpointManager.metadata`
    returns). Read from the step's manifest; no array data is read.

    Attributes:
      step: The step number (from the manifest, not the name).
      name: The step's directory name.
      path: The step's checkpoint path or URL (pass it to :func:`keepax.restore` and friends).
      temporary: Whether it is a temporary checkpoint, deleted once a newer one is committed.
      time: When it was saved, on the manager's clock (the one policies see).
      created: When its manifest was written, as Unix time.
      duration: Seconds from the start of the save to its manifest being written.
      nbytes: Bytes of its data files.
      metrics: The metrics saved with it.
      metadata: The user metadata saved with it.
      placeholders: The name template's placeholder values it was saved with.
    """

    step: int
    name: str
    path: str
    temporary: bool
    time: float
    created: float
    duration: float | None
    nbytes: int
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    placeholders: Mapping[str, Any]

    def record(self) -> policies.StepRecord:
        """The facts the keep policies see."""
        return policies.StepRecord(self.step, self.time, self.temporary, dict(self.metrics))


def _step_info(name: str, info: checkpoint.CheckpointInfo) -> StepInfo:
    """Reads the manager's facts from a checkpoint's metadata; ValueError if there are none."""
    meta = info.metadata.get(MANAGER_KEY)
    if not isinstance(meta, dict):
        raise ValueError(
            f"a keepax checkpoint without {MANAGER_KEY!r} metadata (not written by a "
            "CheckpointManager)"
        )
    step, when, temporary = meta.get("step"), meta.get("time"), meta.get("temporary")
    if type(step) is not int or step < 0:
        raise ValueError(f"its {MANAGER_KEY!r} metadata has no valid step ({step!r})")
    if not _is_real(when) or not isinstance(temporary, bool):
        raise ValueError(f"its {MANAGER_KEY!r} metadata lacks a valid time or temporary flag")
    metrics = meta.get("metrics") or {}
    placeholders = meta.get("placeholders") or {}
    user = info.metadata.get(USER_KEY) or {}
    if not all(isinstance(m, dict) for m in (metrics, placeholders, user)):
        raise ValueError(f"its {MANAGER_KEY!r} metadata is malformed")
    started = meta.get("started")
    return StepInfo(
        step=step,
        name=name,
        path=info.path,
        temporary=temporary,
        time=float(when),
        created=info.created,
        duration=info.created - started if _is_real(started) else None,
        nbytes=sum(n for _, n in info.files),
        metrics=types.MappingProxyType({str(k): v for k, v in metrics.items()}),
        metadata=types.MappingProxyType(user),
        placeholders=types.MappingProxyType(placeholders),
    )


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Input checks (pure).


def _check_step(step: Any) -> int:
    if not isinstance(step, bool):
        try:
            value = operator.index(step)
        except TypeError:
            pass
        else:
            if value >= 0:
                return value
    raise PolicyError(f"a step must be a non-negative int, got {step!r}.")


def _check_metrics(metrics: Any, step: int, where: str) -> dict[str, float]:
    """Metrics as ``{name: float}``; each value a finite real number."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise KeepaxError(
            f"metrics must be a dict of name -> number, got {type(metrics).__name__}",
            path=where, step=step,
        )
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise KeepaxError(f"metric names must be str, got {name!r}", path=where, step=step)
        number = _real(value)
        if number is None or not math.isfinite(number):
            raise KeepaxError(
                f"metric {name!r} is {value!r}; metrics must be finite real numbers (convert "
                "with float(...); leave out a metric you do not have rather than passing NaN)",
                path=where, step=step,
            )
        out[name] = number
    return out


def _real(value: Any) -> float | None:
    """A Python, NumPy or 0-d array real number as a float, else None."""
    if _is_real(value):
        return float(value)
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        dtype = value.dtype
        if jax.numpy.issubdtype(dtype, jax.numpy.integer) or jax.numpy.issubdtype(
            dtype, jax.numpy.floating
        ):
            return float(value)
    return None


def _json_value(value: Any) -> Any:
    """A placeholder value as stored in the manifest (JSON scalars as they are, else text)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, str | int | float | bool) else str(value)


def _check_save_policy(policy: Any) -> policies.SavePolicy | None:
    if policy is not None and not callable(getattr(policy, "decide", None)):
        raise PolicyError(
            f"save_policy {policy!r} is not a save policy: it needs a decide(step, ctx) method, "
            "like policies.EveryNSteps(100); pass None to save on every call."
        )
    return policy


def _check_keep(keep: Any) -> list[policies.KeepPolicy]:
    if callable(getattr(keep, "keep", None)):
        keep = [keep]  # a single policy
    if isinstance(keep, str | bytes | Mapping) or not isinstance(keep, Iterable):
        raise PolicyError(f"keep must be a list of keep policies such as [KeepLast(3)], got "
                          f"{keep!r}.")
    keep = list(keep)
    policies.plan([], keep)  # validates each policy
    return keep


def _check_grace(seconds: Any) -> float:
    if not _is_real(seconds) or not math.isfinite(seconds) or seconds < 0:
        raise PolicyError(f"staging_grace must be a finite number of seconds >= 0, got "
                          f"{seconds!r}.")
    return float(seconds)


def _check_async(async_save: Any, max_in_flight: Any, staging_budget_bytes: Any) -> None:
    if not isinstance(async_save, bool):
        raise PolicyError(f"async_save must be True or False, got {async_save!r}.")
    try:
        async_engine._check_limits(max_in_flight, staging_budget_bytes)
    except ValueError as e:
        raise PolicyError(f"{e}.") from None


def _check_best(best: Any, keep: Sequence[Any]) -> tuple[str, str] | None:
    """The ``(metric, mode)`` that defines the best step: ``best``, else the first KeepBest's."""
    if best is None:
        for policy in keep:
            if isinstance(policy, policies.KeepBest):
                return (policy.metric, policy.mode)
        return None
    if isinstance(best, str):
        best = (best, "min")
    if (
        not isinstance(best, tuple | list)
        or len(best) != 2
        or not isinstance(best[0], str)
        or not best[0]
        or best[1] not in ("min", "max")
    ):
        raise PolicyError(
            f"best must be a (metric, mode) pair such as ('loss', 'min') or ('accuracy', 'max'), "
            f"got {best!r}."
        )
    return (best[0], best[1])


# ---------------------------------------------------------------------------------------------
# Iterator and host state: objects with get_state() / set_state().


def _is_stateful(x: Any) -> bool:
    return (
        not isinstance(x, type)
        and callable(getattr(x, "get_state", None))
        and callable(getattr(x, "set_state", None))
    )


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


def _state_tree(state: Any, step: int) -> tuple[Any, list[str]]:
    """The tree to save: each stateful object replaced by its ``get_state()``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_stateful)
    out, stateful = [], []
    for path, leaf in leaves:
        if _is_stateful(leaf):
            value = leaf.get_state()
            where = jax.tree_util.keystr(path)
            _check_state_value(value, leaf, where, step)
            stateful.append(where)
            leaf = value
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out), stateful


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
# Restoring a step's tree (items, iterator state, strictness).


def _item_names(info: checkpoint.CheckpointInfo, items: Any) -> list[str] | None:
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


def _restore_tree(
    info: checkpoint.CheckpointInfo,
    like: Any,
    items: list[str] | None,
    partial: bool,
    dtype: Any,
    stats: RestoreStats | None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    path = info.path
    restore = functools.partial(checkpoint.restore, storage_options=storage_options)
    select = [(n,) for n in items] if items is not None else None
    if like is None:
        return restore(path, select=select, dtype=dtype, stats=stats)
    if items is not None:
        like = _pick_items(like, items, path)
    found = [p for p, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_stateful)[0]
             if _is_stateful(x)]
    if not found:
        return restore(path, like, select=select, partial=partial, dtype=dtype,
                                stats=stats)
    # Everything but the stateful objects, checked strictly here (keepax.restore is told
    # partial=True because the objects' saved states are not in this like).
    plain_like = jax.tree_util.tree_map(
        lambda x: None if _is_stateful(x) else x, like, is_leaf=_is_stateful
    )
    if not partial:
        _check_no_extra(info, plain_like, found, items)
    main = plain_like
    if jax.tree_util.tree_leaves(plain_like):
        main = restore(path, plain_like, select=select, partial=True, dtype=dtype,
                                stats=stats)
    # The stateful objects' saved states, exactly as stored (no cast).
    state_like = jax.tree_util.tree_map_with_path(
        lambda p, x: _state_like(info, p) if _is_stateful(x) else None, like,
        is_leaf=_is_stateful,
    )
    states = state_like
    if jax.tree_util.tree_leaves(state_like):
        states = restore(path, state_like, partial=True, stats=stats)

    def put(_: Any, x: Any, value: Any, state: Any) -> Any:
        if _is_stateful(x):
            x.set_state(state)
            return x
        return value

    return jax.tree_util.tree_map_with_path(put, like, main, states, is_leaf=_is_stateful)


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


# ---------------------------------------------------------------------------------------------
# Background work and preemption.


class _Background:
    """Runs deletions on one worker thread, in order, and keeps their errors (and those of
    background writes, reported here) until the manager raises them."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: list[concurrent.futures.Future[None]] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None], on_error: Callable[[BaseException], Exception]
               ) -> None:
        def run() -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - kept and re-raised by the manager
                error = on_error(e)
                error.__cause__ = e
                with self._lock:
                    self._errors.append(error)

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keepax-manager"
            )
        future = self._executor.submit(run)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [future]

    def report(self, error: BaseException) -> None:
        """Keeps an error for the manager to raise at its next call."""
        with self._lock:
            self._errors.append(error)

    def wait(self) -> None:
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)

    def take_errors(self) -> list[BaseException]:
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class _Preemption:
    """SIGTERM/SIGINT handlers that only set a flag (the handler holds no manager)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signaled = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise PolicyError(
                "preemption=True installs SIGTERM/SIGINT handlers, which Python allows only in "
                "the main thread; build the manager there, or call notify_preemption() from "
                "your own handler."
            )
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signaled:
            # A second Ctrl-C: stop now, as without the handler.
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        self.signaled = True

    def uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# The manager.

_OPTION_NAMES = ("save_policy", "keep", "best", "template", "preemption", "discard_newer",
                 "staging_grace", "read_only", "clock", "async_save", "max_in_flight",
                 "staging_budget_bytes")


class CheckpointManager:
    """Saves, finds, restores and prunes the steps of one run in one directory.

    Example:
      >>> mngr = CheckpointManager(                                  # doctest: +SKIP
      ...     "ckpt", save_policy=policies.EveryNSteps(1000),
      ...     keep=[policies.KeepLast(3), policies.KeepBest(2, "loss")], preemption=True)
      >>> state, start = mngr.restore_or_initialize(init_state)      # doctest: +SKIP
      >>> for step in range(0 if start is None else start + 1, 100_000):  # doctest: +SKIP
      ...     state, loss = train_step(state)
      ...     mngr.save(step, state, metrics={"loss": loss})
      ...     if mngr.reached_preemption(step):
      ...         break
      >>> mngr.close()                                               # doctest: +SKIP

    **Saving.** ``save(step, state)`` asks the save policy (``policies.decide``) and writes
    the step when it says so, or when ``force=True``, or at the first call after a preemption
    signal. It returns whether it wrote. A step already held is not written again (``save``
    returns False), except to upgrade a temporary checkpoint to a permanent one, or with
    ``overwrite=True`` (atomic replace); ``force=True`` on a held step is an error.

    **Asynchronous saves** (the default): ``save`` returns once the state is staged — the
    caller may then donate, delete or mutate its arrays — and the step is written and
    committed in the background. At most ``max_in_flight`` saves are in flight (the next
    ``save`` waits), and at most ``staging_budget_bytes`` of staged state await writing
    (beyond it ``save`` streams: it blocks until earlier bytes are written). A background
    failure is raised, naming the step, by the next ``save``, :meth:`wait_until_finished`,
    :meth:`check_for_errors` or :meth:`close`; that step is never committed. Methods that
    report steps (:meth:`all_steps`, :meth:`latest_step`, :meth:`restore`, ...) first wait
    for saves in flight; :meth:`save`, :meth:`should_save` and :meth:`reached_preemption`
    do not. :attr:`save_records` tells how long each save blocked and wrote.

    **Restoring an older step and going on.** Steps must increase: writing a step below the
    latest is an error. To continue from an older step k (e.g. after a divergence), restore it
    with ``restore(step=k, discard_newer=True)`` (or build the manager with
    ``discard_newer=True``): the steps after k are deleted, as CLU does after preemption, and
    k+1, ... can be saved again. Without it, older steps can be restored freely (read only).

    **Keeping.** After each commit the keep policies (``policies.plan``) pick the steps to
    delete; the newest step is never deleted, temporaries go once superseded, and steps the
    manager cannot read (foreign files, corrupt steps) are never touched.

    Args:
      directory: Local directory (created if missing), ``memory://name``, or an object
        store URL such as ``s3://bucket/run`` (README, *Object storage*).
      save_policy: When to save (a :mod:`keepax.policies` save policy); None saves on every
        call.
      keep: Keep policies, e.g. ``[KeepLast(3), KeepEvery(10_000), KeepBest(2, "loss")]``;
        empty keeps every permanent step.
      best: ``(metric, mode)`` defining :meth:`best_step`, e.g. ``("loss", "min")``; by
        default the first :class:`~keepax.policies.KeepBest`'s.
      template: Step directory names, e.g. ``"{step:08d}"`` (default) or
        ``"step_{step}_epoch_{epoch}"``; placeholders other than ``step`` are passed to
        ``save``/``event`` as keyword arguments.
      preemption: Install SIGTERM/SIGINT handlers (main thread only; restored by
        :meth:`close`): after a signal the next ``save`` writes whatever the policy says and
        :meth:`reached_preemption` becomes true.
      discard_newer: Default of :meth:`restore`'s ``discard_newer``.
      read_only: Open without the directory lock, to list and restore only.
      staging_grace: Seconds after which leftovers of interrupted saves (``*.keepax-*``) are
        removed when the manager starts; younger ones may belong to a save in progress.
      clock: Returns the time in seconds (default ``time.time``); policies see this clock.
      async_save: Save in the background (default); False makes ``save`` write and commit
        before returning, raising any failure itself.
      max_in_flight: At most this many saves staged or being written at once.
      staging_budget_bytes: At most this many bytes of staged state not yet written (None:
        no limit beyond ``max_in_flight`` copies of the state). A smaller budget bounds host
        memory at the price of blocking ``save`` while the excess is written.
      storage_options: For a directory URL such as ``s3://bucket/run``: fsspec/s3fs options
        and keepax's ``keepax_*`` transfer options (README, *Object storage*).
      host_local: In a multi-process run, every process saves into its own ``directory``
        (a local disk per host, no shared file system): each writes the shards it holds and
        commits its own copy. Steps count as held only once every process committed them;
        with ``discard_newer`` a process deletes its newer steps that others lack.
      sync_timeout: Seconds a process waits for the others (multi-process runs).

    **Many processes.** In a ``jax.distributed`` run every process builds the manager and
    makes the same calls (``save``, ``restore``, ...). Process 0 holds the directory lock,
    removes leftovers and deletes steps; save decisions (policies, temporaries, a preemption
    signal seen by any process) are taken by process 0 and shared, so every process saves
    the same steps even when their clocks differ.

    Raises:
      PolicyError: An invalid policy, template or option.
      KeepaxError: Another manager holds the directory (the message names its host and PID).
      CheckpointNotFoundError: ``read_only=True`` and the local directory does not exist.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_policy: policies.SavePolicy | None = None,
        keep: Iterable[policies.KeepPolicy] = (),
        best: tuple[str, str] | None = None,
        template: str = DEFAULT_TEMPLATE,
        preemption: bool = False,
        discard_newer: bool = False,
        read_only: bool = False,
        staging_grace: float = _DEFAULT_GRACE,
        clock: Callable[[], float] | None = None,
        async_save: bool = True,
        max_in_flight: int = 1,
        staging_budget_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        host_local: bool = False,
        sync_timeout: float = 600.0,
    ) -> None:
        self._directory = os.fspath(directory)
        self._coord = coordination.current()
        self._multi = self._coord.process_count > 1
        self._host_local = bool(host_local)
        self._leader = not self._multi or self._host_local or self._coord.process_index == 0
        if not (_is_real(sync_timeout) and 0 < sync_timeout < math.inf):
            raise PolicyError(f"sync_timeout must be a positive number of seconds, got "
                              f"{sync_timeout!r}")
        self._sync_timeout = float(sync_timeout)
        self._storage_options = dict(storage_options) if storage_options else None
        _check_async(async_save, max_in_flight, staging_budget_bytes)
        self._async = {"async_save": async_save, "max_in_flight": max_in_flight,
                       "staging_budget_bytes": staging_budget_bytes}
        self._names = NameTemplate(template)
        self._save_policy = _check_save_policy(save_policy)
        self._keep = _check_keep(keep)
        self._best = _check_best(best, self._keep)
        self._best_given = best is not None
        self._grace = _check_grace(staging_grace)
        self._options = {"preemption": bool(preemption), "discard_newer": bool(discard_newer)}
        self._read_only = bool(read_only)
        if self._read_only and preemption:
            raise PolicyError("preemption=True needs a manager that saves; drop read_only=True.")
        self._clock = clock if clock is not None else time.time
        try:
            self._storage: Storage = open_root(self._directory, storage_options)
        except ValueError as e:
            raise PolicyError(str(e)) from None
        self._where = self._storage.display("")

        self._records: dict[int, StepInfo] = {}
        self._pending: dict[int, StepInfo] = {}  # steps staged or being written
        self._engine = async_engine.SaveEngine(
            os.path.basename(self._directory.rstrip("/")) or "root", key=self._storage_key()
        )
        self._skipped: dict[str, str] = {}
        self._event_counts: collections.Counter[str] = collections.Counter()
        self._state_lock = threading.Lock()
        self._background = _Background()
        self._preemption = _Preemption()
        self._preempted_at: int | None = None
        self._closed = False
        self._lock = DirectoryLock(self._storage)
        self._make_directory()
        if not self._read_only and self._leader:
            self._lock.acquire()
        self._finalizer = weakref.finalize(self, _release, self._lock, self._preemption)
        try:
            # Saves this process still has in flight into the directory (from a manager
            # dropped unclosed) finish first.
            async_engine.wait_for(self._storage_key())
            if not self._read_only and self._leader:
                self._remove_leftovers()
            if self._multi:
                self._coord.barrier("manager.open", **self._sync())
            self._scan()
            self._start_time = self._now()
            if preemption:
                self._preemption.install()
        except BaseException:
            self._finalizer()
            raise

    # -- configuration ---------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The manager's configuration as a JSON-able dict (see :meth:`from_config`).

        Raises:
          PolicyError: A policy cannot describe itself (a custom one without ``to_config``).
        """
        def config(policy: Any) -> dict[str, Any]:
            if not callable(getattr(policy, "to_config", None)):
                raise PolicyError(f"policy {policy!r} has no to_config(); it cannot be saved "
                                  "as configuration.")
            return policy.to_config()

        return {
            "directory": self._directory,
            "template": self._names.template,
            "save_policy": None if self._save_policy is None else config(self._save_policy),
            "keep": [config(p) for p in self._keep],
            "best": list(self._best) if self._best_given and self._best else None,
            "preemption": self._options["preemption"],
            "discard_newer": self._options["discard_newer"],
            "staging_grace": self._grace,
            **self._async,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> CheckpointManager:
        """Builds a manager from :meth:`to_config`'s dict (after a JSON round trip too).

        Args:
          config: The configuration.
          **overrides: Constructor arguments replacing the configuration's (e.g.
            ``directory=...``, ``read_only=True``, ``clock=...``, ``storage_options=...``).

        Raises:
          PolicyError: An unknown or invalid field.
        """
        if not isinstance(config, Mapping):
            raise PolicyError(f"a manager config must be a dict, got {config!r}.")
        known = {"directory", *_OPTION_NAMES}
        # storage_options (credentials, endpoints) are never in a config: pass them here.
        unknown = sorted(set(config) - known) + sorted(
            set(overrides) - known - {"storage_options"}
        )
        if unknown:
            raise PolicyError(f"unknown manager config field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}.")
        args = dict(config)
        if args.get("save_policy") is not None:
            args["save_policy"] = policies.policy_from_config(args["save_policy"])
        keep = args.get("keep") or []
        if isinstance(keep, Mapping) or not isinstance(keep, list | tuple):
            raise PolicyError(f"config field 'keep' must be a list of policy configs, got "
                              f"{keep!r}.")
        args["keep"] = [policies.policy_from_config(c) for c in keep]
        if args.get("best") is not None:
            args["best"] = tuple(args["best"])
        args.update(overrides)
        if "directory" not in args:
            raise PolicyError("a manager config needs a 'directory'.")
        return cls(args.pop("directory"), **args)

    # -- what is there -------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The manager's directory, as given."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Every step held (committed, readable), ascending; temporaries included. Waits for
        saves in flight first."""
        self._settle()
        return sorted(self._records)

    def latest_step(self) -> int | None:
        """The highest step held, or None. Waits for saves in flight first."""
        self._settle()
        return max(self._records, default=None)

    @property
    def save_records(self) -> tuple[async_engine.SaveRecord, ...]:
        """What the last (up to 1000) finished saves did: blocking time, time waited for
        saves in flight or the staging budget, bytes staged, write time, bytes written,
        throughput; oldest first. Each is also logged at INFO on the ``"keepax"`` logger."""
        return tuple(self._engine.records)

    def best_step(self) -> int | None:
        """The step with the best value of the ``best`` metric (ties: the newer step), or None
        if no step has that metric.

        Raises:
          PolicyError: No metric defines "best" (pass ``best=`` or a KeepBest keep policy).
        """
        if self._best is None:
            raise PolicyError(
                "no metric defines the best step; build the manager with best=('loss', 'min') "
                "or with a policies.KeepBest keep policy."
            )
        self._settle()
        metric, mode = self._best
        sign = 1.0 if mode == "min" else -1.0
        ranked = [(sign * r.metrics[metric], -r.step) for r in self._records.values()
                  if _is_real(r.metrics.get(metric)) and math.isfinite(r.metrics[metric])]
        return -min(ranked)[1] if ranked else None

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        self._settle()
        return dict(self._record(step).metrics)

    def metadata(self, step: int) -> StepInfo:
        """What is known about ``step`` without reading arrays: user metadata, time, duration,
        size, temporary, metrics, name and path."""
        self._settle()
        return self._record(step)

    def item_metadata(self, step: int | str | None = None) -> Any:
        """The structure of a step's state, with a :class:`keepax.LeafInfo` (type, shape, dtype,
        size) at each leaf; no array data is read."""
        self._check_open()
        self._settle()
        return checkpoint.inspect(self._resolve(step).path,
                                storage_options=self._storage_options).tree

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write (by policy or a pending preemption)."""
        step = _check_step(step)
        decision = self._decide(step, None, 0)
        held = self._view().get(step)
        if decision == policies.Decision.SKIP or held is None:
            return decision != policies.Decision.SKIP
        return held.temporary and decision == policies.Decision.PERMANENT

    def plan_deletions(self) -> policies.RetentionPlan:
        """What the keep policies would delete now (a dry run): ``plan.delete``, ``plan.keep``,
        and ``print(plan.describe())`` for the reasons. Waits for saves in flight first."""
        self._settle()
        return self._plan()

    def _plan(self) -> policies.RetentionPlan:
        with self._state_lock:
            records = [r.record() for r in self._records.values()]
        return policies.plan(records, self._keep)

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal arrived and a save at ``step`` or before has run since:
        the loop should exit now."""
        return self._preempted_at is not None and _check_step(step) >= self._preempted_at

    def notify_preemption(self) -> None:
        """Acts as if SIGTERM had arrived (for your own signal handling, and for tests)."""
        self._preemption.signaled = True

    def reload(self) -> None:
        """Re-reads the directory (another process may have written or deleted steps)."""
        self._check_open()
        self._settle()
        self._scan()

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
        overwrite: bool = False,
        **placeholders: Any,
    ) -> bool:
        """Saves ``state`` as ``step`` if the save policy (or ``force``, or a pending
        preemption) says so.

        Args:
          step: The step, a non-negative int.
          state: Any pytree; typically a dict of named items (``{"params": ..., "opt_state":
            ..., "data_iter": ...}``), each restorable alone. Objects with ``get_state()`` /
            ``set_state()`` anywhere in it are saved as their state.
          metrics: Finite real numbers by name (for ``KeepBest`` and :meth:`best_step`).
          metadata: JSON-able user metadata.
          force: Save whatever the policy says.
          overwrite: Replace the step if it is already held (atomically).
          **placeholders: Values of the name template's placeholders (e.g. ``epoch=3``).

        Returns:
          Whether the step is written: with ``async_save`` (the default), it is staged when
          ``save`` returns (the caller may donate or change its arrays) and committed in the
          background; otherwise committed.

        Raises:
          CheckpointExistsError: ``force=True`` for a step already held, without ``overwrite``.
          KeepaxError: ``step`` is below the latest step (see the class docs), the metrics
            are not finite numbers, an earlier background save or deletion failed (the error
            names its step; this save is not made), or the manager is read-only or closed.
          PolicyError: Missing or unknown placeholders.
        """
        return self._save(step, state, None, metrics, metadata, force, overwrite, placeholders)

    def event(
        self,
        name: str,
        /,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: dict[str, Any] | None = None,
        force: bool = False,
        overwrite: bool = False,
        **placeholders: Any,
    ) -> bool:
        """Reports a lifecycle event (``"epoch_end"``, ``"phase_start"``, ...; see
        :data:`keepax.policies.LIFECYCLE_EVENTS`) and saves if the policy says so, e.g. with
        ``save_policy=policies.OnEvents(["epoch_end"], every_n=2)``. Occurrences are counted
        per event name. Otherwise as :meth:`save`.

        Raises:
          PolicyError: An unknown event name.
        """
        if name not in policies.LIFECYCLE_EVENTS:
            raise PolicyError(
                f"unknown event {name!r}; the lifecycle events are: "
                f"{', '.join(sorted(policies.LIFECYCLE_EVENTS))}."
            )
        self._check_writable("event")
        self._event_counts[name] += 1
        return self._save(step, state, name, metrics, metadata, force, overwrite, placeholders)

    def _save(
        self,
        step: Any,
        state: Any,
        event: str | None,
        metrics: Any,
        metadata: Any,
        force: bool,
        overwrite: bool,
        placeholders: dict[str, Any],
    ) -> bool:
        self._check_writable("save")
        self.check_for_errors()
        step = _check_step(step)
        name = self._names.format(step, placeholders)
        count = self._event_counts[event] if event else 0
        preempted = self._preemption_pending()
        decision = self._decide(step, event, count)
        if self._multi:
            preempted, decision = self._shared_decision(step, event, count, preempted)
        if force:
            decision = policies.Decision.PERMANENT
        replaced = self._action(step, decision, force=force, overwrite=overwrite)
        if isinstance(replaced, StepInfo) and replaced is self._pending.get(step):
            # Replacing a step still being saved (overwrite, or a temporary made permanent):
            # once that save is committed (or failed).
            self._settle()
            self.check_for_errors()
            replaced = self._action(step, decision, force=force, overwrite=overwrite)
        if preempted:
            self._preempted_at = step
        if replaced is None:
            return False
        where = self._storage.display(name)
        self._write(
            step=step,
            name=name,
            state=state,
            temporary=decision == policies.Decision.TEMPORARY,
            metrics=_check_metrics(metrics, step, where),
            metadata=checkpoint.check_metadata(metadata, where, step),
            placeholders={k: _json_value(v) for k, v in placeholders.items()},
            replaced=replaced if isinstance(replaced, StepInfo) else None,
        )
        return True

    def _action(
        self, step: int, decision: policies.Decision, *, force: bool, overwrite: bool
    ) -> StepInfo | bool | None:
        """What a save of ``step`` does: None (skip), True (write a new step), or the held
        step to replace. Raises for a step below the latest (unless it is held and
        ``overwrite`` replaces it) and for a held step with ``force``."""
        if decision == policies.Decision.SKIP:
            return None
        view = self._view()
        held = view.get(step)
        if held is not None and overwrite:
            return held
        latest = max(view, default=None)
        if latest is not None and step < latest:
            # Whether or not this step is held: going on below the latest would mix two
            # histories (the old steps after this one would stay).
            raise KeepaxError(
                f"step {step} is below the latest step {latest}: steps must increase. To go on "
                f"from an older step k, restore it with restore(step=k, discard_newer=True) (or "
                "build the manager with discard_newer=True), which deletes the steps after k; "
                f"otherwise save steps above {latest}",
                path=self._where, step=step,
            )
        if held is not None:
            if held.temporary and decision == policies.Decision.PERMANENT:
                return held
            if force:
                raise CheckpointExistsError(
                    "this step is already saved; pass overwrite=True to replace it (atomically)",
                    path=held.path, step=step,
                )
            return None  # already saved
        return True

    def _write(
        self,
        *,
        step: int,
        name: str,
        state: Any,
        temporary: bool,
        metrics: dict[str, float],
        metadata: dict[str, Any],
        placeholders: dict[str, Any],
        replaced: StepInfo | None,
    ) -> None:
        """The one write path: state -> staged -> (background) checkpoint -> commit ->
        :meth:`_committed` (record, retention).

        Iterator states, Python values and metadata are captured here, in the caller's thread;
        arrays are staged by the engine before this returns.
        """
        tree, stateful = _state_tree(state, step)
        facts = {
            "version": _SCHEMA,
            "step": step,
            "temporary": temporary,
            "time": float(self._now()),
            "started": time.time(),
            "metrics": metrics,
            "placeholders": placeholders,
            "iterators": stateful,
        }
        path = self._storage.display(name)
        replace = replaced is not None and replaced.name == name
        full_metadata = {MANAGER_KEY: facts, USER_KEY: metadata}

        def prepare() -> checkpoint.PreparedSave:
            try:
                return checkpoint.prepare_save(path, tree, metadata=full_metadata,
                                             storage_options=self._storage_options,
                                             overwrite=replace, host_local=self._host_local,
                                             step=step, timeout=self._sync_timeout)
            except CheckpointExistsError as e:
                raise CheckpointExistsError(
                    f"the name {name!r} is taken by an entry that is not one of this manager's "
                    "steps (skipped with a warning); move it away, change the name template, "
                    "or pass overwrite=True to replace it",
                    path=path, step=step,
                ) from e
            except KeepaxError as e:
                if e.step is None:
                    e.step = step
                raise

        # The writer holds the manager weakly: one dropped unclosed is still collected (and
        # its lock released); its saves in flight still commit (a new manager on the same
        # directory waits for them), with no bookkeeping left to do.
        manager = weakref.ref(self)

        def committed(_: checkpoint.SaveResult) -> None:
            mngr = manager()
            if mngr is not None:
                mngr._committed(step, name, path, replaced)

        def failed(error: KeepaxError) -> None:
            mngr = manager()
            if mngr is not None:
                mngr._forget_pending(step)
                mngr._background.report(error)

        in_flight = StepInfo(
            step=step, name=name, path=path, temporary=temporary, time=facts["time"],
            created=facts["started"], duration=None, nbytes=0,
            metrics=types.MappingProxyType(metrics), metadata=types.MappingProxyType(metadata),
            placeholders=types.MappingProxyType(placeholders),
        )
        with self._state_lock:
            self._pending[step] = in_flight
        try:
            self._engine.save(
                prepare,
                step=step,
                path=path,
                max_in_flight=self._async["max_in_flight"],
                staging_budget_bytes=self._async["staging_budget_bytes"],
                background=self._async["async_save"],
                on_commit=committed,
                on_error=failed,
                check=self.check_for_errors,
            )
        except BaseException:
            self._forget_pending(step)
            raise

    def _committed(self, step: int, name: str, path: str, replaced: StepInfo | None) -> None:
        """Once ``step`` is committed (on the writer thread): records it, then deletes what
        retention says (hidden now, files removed in the background)."""
        record = self._open(name)
        if record is None:
            raise KeepaxError("the step was saved but cannot be read back", path=path, step=step)
        with self._state_lock:
            self._records[step] = record
            self._pending.pop(step, None)
        if replaced is not None and replaced.name != name:
            self._discard([replaced])
        plan = self._plan()
        with self._state_lock:
            doomed = [self._records[s] for s in plan.delete if s in self._records]
        self._discard(doomed)

    def _forget_pending(self, step: int) -> None:
        with self._state_lock:
            self._pending.pop(step, None)

    def _view(self) -> dict[int, StepInfo]:
        """The steps held and those being saved: what save decisions see."""
        with self._state_lock:
            return {**self._records, **self._pending}

    def _settle(self) -> None:
        """Waits for saves in flight (their errors are raised by the calls that raise)."""
        self._engine.wait()

    # -- restoring ---------------------------------------------------------------------------

    def restore(
        self,
        step: int | str | None = None,
        like: Any = None,
        *,
        items: Sequence[str] | None = None,
        partial: bool = False,
        dtype: Any = None,
        discard_newer: bool | None = None,
        stats: RestoreStats | None = None,
    ) -> Any:
        """Restores a step.

        Args:
          step: None (the latest), a step number, or ``"best"`` (:meth:`best_step`).
          like: As for :func:`keepax.restore`: the same structure comes back, placed on its
            shardings, strictly checked. Objects with ``get_state()``/``set_state()`` in it
            get ``set_state(saved state)`` and are returned in place. Without ``like``: plain
            dicts/lists of NumPy arrays, and the raw saved state of such objects.
          items: Restore only these top-level items of a dict state (e.g. ``["params"]``),
            without reading the others; returns a dict of them. ``like`` may be the whole
            state or just those items.
          partial: With ``like``, allow stored leaves that ``like`` lacks.
          dtype: ``"like"`` or a dtype to cast floating arrays to (as :func:`keepax.restore`;
            saved iterator state is never cast).
          discard_newer: Delete the steps after this one once it is restored, so training can
            continue from it (default: the manager's ``discard_newer``).
          stats: Filled with what was read (bytes, chunks, files).

        Raises:
          CheckpointNotFoundError: No such step (the message lists those held).
          TreeMismatchError: ``like`` does not match the step.
        """
        self._check_open()
        self._settle()
        if discard_newer is None:
            discard_newer = self._options["discard_newer"]
        if discard_newer:
            self._check_writable("restore(discard_newer=True)")
        record = self._resolve(step)
        info = checkpoint.inspect(record.path, storage_options=self._storage_options)
        try:
            result = _restore_tree(info, like, _item_names(info, items), partial, dtype, stats,
                                   self._storage_options)
        except KeepaxError as e:
            if e.step is None:
                e.step = record.step
            raise
        if discard_newer:
            newer = [r for s, r in sorted(self._records.items()) if s > record.step]
            self._discard(newer, raise_now=True)
        return result

    def restore_or_initialize(self, init_state: Any, *, partial: bool = False,
                              dtype: Any = None) -> tuple[Any, int | None]:
        """Restores the latest step onto ``init_state``'s structure, or returns
        ``init_state`` itself when no step is held.

        Returns:
          ``(state, step)``: ``step`` is the restored step, or None when initialised.
        """
        latest = self.latest_step()
        if latest is None:
            return init_state, None
        return self.restore(latest, init_state, partial=partial, dtype=dtype), latest

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Deletes a step (its files are removed in the background; see
        :meth:`wait_until_finished`)."""
        self._check_writable("delete")
        self._settle()
        self._discard([self._record(step)], raise_now=True)

    def _discard(self, records: Iterable[StepInfo], *, raise_now: bool = False) -> None:
        """Hides each step now (rename to trash, or remove its commit marker), then removes its
        files in the background. A failure to hide is raised now (``raise_now``) or at the next
        call; the step then stays held. In a multi-process run only process 0 (or, with
        ``host_local``, each process in its own directory) touches the storage."""
        for record in records:
            if not self._leader:
                with self._state_lock:
                    if self._records.get(record.step) is record:
                        del self._records[record.step]
                continue
            try:
                trash = self._hide(record.name)
            except Exception as e:  # noqa: BLE001 - surfaced below or at the next call
                error = KeepaxError(
                    f"deleting step {record.step} failed: {e}; it is still held",
                    path=record.path, step=record.step,
                )
                error.__cause__ = e
                if raise_now:
                    raise error from e
                self._background.report(error)
                continue
            with self._state_lock:
                if self._records.get(record.step) is record:
                    del self._records[record.step]
            self._background.submit(
                lambda trash=trash: self._storage.delete(trash),
                lambda e, record=record, trash=trash: KeepaxError(
                    f"removing the files of deleted step {record.step} failed in the background: "
                    f"{e}. The step is gone from the manager; its files remain under "
                    f"{self._storage.display(trash)} (removed when a manager next starts here, "
                    "or delete them by hand)",
                    path=record.path, step=record.step,
                ),
            )

    def _hide(self, name: str) -> str:
        """Makes a step invisible to readers, atomically; returns what is left to remove."""
        if self._storage.atomic_rename:
            trash = f"{name}.keepax-trash-{uuid.uuid4().hex[:12]}"
            self._storage.rename_dir(name, trash)
            return trash
        self._storage.delete(f"{name}/{COMMIT_FILE}")
        return name

    # -- background work and lifetime --------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Waits for saves in flight to be committed and for background deletions; raises the
        errors of background work."""
        self._settle()
        self._background.wait()
        self.check_for_errors()

    def check_for_errors(self) -> None:
        """Raises the first error of finished background work, if any (once).

        Raises:
          KeepaxError: A background save or deletion failed (the error names the step and
            path; more failures are listed in its notes).
        """
        errors = self._background.take_errors()
        if not errors:
            return
        first = errors[0]
        if len(errors) > 1:
            first.add_note(f"{len(errors) - 1} more background failure(s):")
            for other in errors[1:]:
                first.add_note(f"  {other}")
        raise first

    def close(self) -> None:
        """Waits for saves in flight and background deletions, releases the directory lock
        and the signal handlers, then raises any background error. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._settle()
            self._background.wait()
            self._background.shutdown()
        finally:
            self._finalizer()
        self.check_for_errors()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as error:  # noqa: BLE001 - attached to the exception in flight
            exc.add_note(f"and closing the CheckpointManager failed too: {error!r}")

    def __repr__(self) -> str:
        steps = self.all_steps()
        shown = f"{len(steps)} steps" + (f", latest {steps[-1]}" if steps else "")
        mode = ", read_only" if self._read_only else ""
        return f"CheckpointManager({self._directory!r}: {shown}{mode})"

    # -- internals ---------------------------------------------------------------------------

    def _now(self) -> float:
        now = self._clock()
        if not _is_real(now):
            raise PolicyError(f"the manager's clock returned {now!r}; it must return seconds.")
        return float(now)

    def _preemption_pending(self) -> bool:
        return self._preemption.signaled and self._preempted_at is None

    def _sync(self, step: int | None = None) -> dict[str, Any]:
        return {"timeout": self._sync_timeout, "step": step, "path": self._where}

    def _shared_decision(
        self, step: int, event: str | None, count: int, preempted: bool
    ) -> tuple[bool, policies.Decision]:
        """Process 0's save decision, given a preemption signal on any process."""
        both = [int(self._decide(step, event, count, preempted=p)) for p in (False, True)]
        reports = self._coord.all_gather(
            "manager.save", {"preempted": preempted, "decisions": both}, **self._sync(step)
        )
        anyone = any(r["preempted"] for r in reports)
        return anyone, policies.Decision(reports[0]["decisions"][int(anyone)])

    def _decide(self, step: int, event: str | None, count: int, *,
                preempted: bool | None = None) -> policies.Decision:
        view = self._view()
        times = [r.time for r in view.values()]
        ctx = policies.SaveContext(
            now=self._now(),
            last_step=max(view, default=None),
            last_save_time=max(times, default=self._start_time),
            event=event,
            event_count=count,
            preempted=self._preemption_pending() if preempted is None else preempted,
        )
        if self._save_policy is None:
            return policies.Decision.PERMANENT
        return policies.decide(self._save_policy, step, ctx)

    def _check_open(self) -> None:
        if self._closed:
            raise KeepaxError("this CheckpointManager is closed; build a new one",
                              path=self._where)

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self._read_only:
            raise KeepaxError(f"{what} needs a writable manager; this one was opened with "
                              "read_only=True", path=self._where)

    def _record(self, step: Any) -> StepInfo:
        step = _check_step(step)
        record = self._records.get(step)
        if record is None:
            raise CheckpointNotFoundError(
                f"step {step} does not exist; {self._available()}", path=self._where, step=step
            )
        return record

    def _resolve(self, step: int | str | None) -> StepInfo:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(
                    "no steps saved here yet; save one first, or use restore_or_initialize",
                    path=self._where,
                )
            return self._records[latest]
        if isinstance(step, str):
            if step != "best":
                raise KeepaxError(f"step must be None, an int or 'best', got {step!r}",
                                  path=self._where)
            best = self.best_step()
            if best is None:
                metric = self._best[0] if self._best else "?"
                raise CheckpointNotFoundError(
                    f"no step has the metric {metric!r}, so there is no best step; "
                    f"{self._available()}",
                    path=self._where,
                )
            return self._records[best]
        return self._record(step)

    def _available(self) -> str:
        steps = self.all_steps()
        if not steps:
            return "no steps are saved here"
        shown = ", ".join(map(str, steps if len(steps) <= 20 else steps[:8] + steps[-8:]))
        if len(steps) > 20:
            shown = shown.replace(f"{steps[7]}, ", f"{steps[7]}, ..., ", 1)
        return f"the available steps are: {shown}"

    def _make_directory(self) -> None:
        if not isinstance(self._storage, LocalStorage):
            return
        if os.path.isdir(self._storage.root):
            return
        if self._read_only:
            raise CheckpointNotFoundError("the manager directory does not exist",
                                          path=self._where)
        os.makedirs(self._storage.root, exist_ok=True)

    def _open(self, name: str) -> StepInfo | None:
        """Reads one entry of the directory as a step; None (with a warning) if it is not."""
        path = self._storage.display(name)
        try:
            return _step_info(name, checkpoint.inspect(path, storage_options=self._storage_options))
        except (KeepaxError, OSError, ValueError) as e:
            reason = str(e)
        if not self._storage.atomic_rename and self._storage.is_unfinished(name):
            return None  # Object stores: a save in progress or interrupted (no marker yet).
        if not self._storage.exists(name):
            return None  # Deleted or renamed since it was listed (another process's retention).
        if self._skipped.get(name) != reason:
            self._skipped[name] = reason
            warnings.warn(
                f"{path}: not a step of this manager, skipped and left alone (retention never "
                f"deletes it): {reason}",
                KeepaxWarning,
                stacklevel=4,
            )
        return None

    def _storage_key(self) -> str:
        root = getattr(self._storage, "root", None)
        return os.path.realpath(root) if isinstance(root, str) else self._where

    def _scan(self) -> None:
        """Lists the directory and reads the steps not read before (after the saves this
        process has in flight into it, by this manager or another)."""
        async_engine.wait_for(self._storage_key())
        known = {r.name: r for r in self._records.values()}
        found: dict[int, StepInfo] = {}
        for name in self._storage.list(""):
            if is_hidden_name(name):
                continue
            record = known.get(name) or self._open(name)
            if record is None:
                continue
            other = found.get(record.step)
            if other is not None:
                warnings.warn(
                    f"{record.path}: holds step {record.step}, like {other.path}; skipped and "
                    "left alone (delete one of them)",
                    KeepaxWarning,
                    stacklevel=3,
                )
                continue
            found[record.step] = record
        if self._multi and self._host_local:
            found = self._committed_everywhere(found)
        with self._state_lock:
            self._records = found

    def _committed_everywhere(self, found: dict[int, StepInfo]) -> dict[int, StepInfo]:
        """With ``host_local``: the steps every process committed in its own directory; with
        ``discard_newer``, this process's steps newer than those are deleted."""
        lists = self._coord.all_gather("manager.steps", sorted(found), **self._sync())
        common = set(found).intersection(*map(set, lists))
        latest = max(common, default=-1)
        newer = [r for s, r in sorted(found.items()) if s not in common and s > latest]
        if newer and self._options["discard_newer"] and not self._read_only:
            self._discard(newer, raise_now=True)
        elif newer:
            warnings.warn(
                f"{self._where}: steps {[r.step for r in newer]} were committed here but not by "
                "every process; they are ignored (pass discard_newer=True to delete them)",
                KeepaxWarning, stacklevel=4,
            )
        return {s: r for s, r in found.items() if s in common}

    def _remove_leftovers(self) -> None:
        """Removes what interrupted saves and deletions left, once nothing in it has changed
        for the grace period: staging and trash directories (``*.keepax-*``) and, on object
        stores (marker commits), step directories without a commit marker. Storages that keep
        no modification times (in-memory) are left as they are.
        """
        now = time.time()
        marker = not self._storage.atomic_rename
        for name in self._storage.list(""):
            if name.startswith(LOCK_NAME):
                continue
            try:
                if not (is_hidden_name(name) or (marker and self._storage.is_unfinished(name))):
                    continue
                modified = self._storage.modified(name)
                if modified is None or now - modified < self._grace:
                    continue
                self._storage.delete(name)
            except OSError as e:
                warnings.warn(f"could not remove the leftover {self._storage.display(name)}: {e}",
                              KeepaxWarning, stacklevel=4)


def _release(lock: DirectoryLock, preemption: _Preemption) -> None:
    """Releases what a manager holds (also when it is garbage-collected unclosed)."""
    try:
        preemption.uninstall()
    finally:
        lock.release()
