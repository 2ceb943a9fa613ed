"""The manager's one write path: decide, capture, stage, write, commit, record, prune.

:class:`Saver` asks the :class:`~keepax._src.manager.decision.SaveDecider` (the one place
where the decision is taken), then :meth:`StepSave.capture` takes the state in the caller's
thread (stateful objects replaced by their state; the facts stored under
:data:`~keepax._src.manager.index.MANAGER_KEY` fixed). The async engine stages the arrays and,
on its writer thread, prepares (:meth:`StepSave.prepare`), writes and commits the checkpoint;
then the step is recorded in the index and retention applied.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from keepax import policies
from keepax._src import checkpoint
from keepax._src.async_engine import engine as async_engine
from keepax._src.checkpoint import casting
from keepax._src.checkpoint.incremental import ChunkStore
from keepax._src.io import Storage
from keepax._src.manager import stateful
from keepax._src.manager.decision import SaveDecider, plan_action
from keepax._src.manager.index import MANAGER_KEY, SCHEMA, USER_KEY, StepIndex, StepInfo
from keepax._src.manager.options import Options, check_metrics, check_step, json_value
from keepax._src.manager.preemption import Preemption
from keepax._src.manager.retention import Background, Retention
from keepax.errors import CheckpointExistsError, KeepaxError

__all__ = ["CommitCallback", "Notify", "SaveRequest", "Saver", "StepSave"]

CommitCallback = Callable[[int, "Exception | None"], object]
"""``on_commit(step, error)``: ``error`` is None once the step is committed, else why its save
failed."""


@dataclasses.dataclass(frozen=True)
class SaveRequest:
    """What a ``save`` or ``event`` call was given (see :meth:`CheckpointManager.save`)."""

    step: Any
    state: Any
    event: str | None = None
    metrics: Mapping[str, float] | None = None
    metadata: dict[str, Any] | None = None
    force: bool = False
    overwrite: bool = False
    placeholders: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype: Any = None
    on_commit: CommitCallback | None = None

    def check(self) -> None:
        """Checks ``dtype`` and ``on_commit`` (before any decision: a skipped save checks
        them too).

        Raises:
          KeepaxError: ``dtype`` is not a floating-point dtype, or ``on_commit`` is not
            callable.
        """
        if self.dtype is not None:
            casting.floating_dtype(self.dtype)
        if self.on_commit is not None and not callable(self.on_commit):
            raise KeepaxError(f"on_commit must be a callable (step, error) -> None, got "
                              f"{self.on_commit!r}")


class Notify:
    """Calls a save's ``on_commit(step, error)`` exactly once: with None once the step is
    committed, or with the error of a failed save. An exception raised by the callback is
    kept, naming the step, and raised by the manager's next call.

    Args:
      step: The step being saved.
      path: Its path, for errors.
      callback: The user's callback (None: nothing to call).
      background: Where the callback's own failures are kept.
    """

    def __init__(self, step: int, path: str, callback: CommitCallback | None,
                 background: Background) -> None:
        self._step, self._path = step, path
        self._callback = callback
        self._background = background
        self._lock = threading.Lock()
        self._called = False

    def __call__(self, error: Exception | None) -> None:
        with self._lock:
            if self._called or self._callback is None:
                return
            self._called = True
        try:
            self._callback(self._step, error)
        except Exception as e:  # noqa: BLE001 - kept and raised by the manager's next call
            outcome = "committed" if error is None else "failed"
            kept = KeepaxError(f"the on_commit callback raised {type(e).__name__}: {e} (the "
                               f"step's save {outcome} all the same)",
                               path=self._path, step=self._step)
            kept.__cause__ = e
            self._background.report(kept)


@dataclasses.dataclass(frozen=True)
class StepSave:
    """A step about to be written.

    Attributes:
      step: The step number.
      name: Its directory name.
      path: Its checkpoint path or URL.
      tree: The tree to write (stateful objects replaced by their states).
      temporary: Whether it is a temporary checkpoint.
      time: When it is saved, on the manager's clock.
      started: When the save started, as Unix time.
      metrics: Checked metrics.
      metadata: Checked user metadata.
      placeholders: The name template's placeholder values, as stored.
      iterators: Key paths of the stateful objects captured.
      replace: Whether it replaces a held step of the same name.
    """

    step: int
    name: str
    path: str
    tree: Any
    temporary: bool
    time: float
    started: float
    metrics: dict[str, float]
    metadata: dict[str, Any]
    placeholders: dict[str, Any]
    iterators: list[str]
    replace: bool

    @classmethod
    def capture(cls, state: Any, *, step: int, name: str, path: str, temporary: bool,
                now: float, metrics: dict[str, float], metadata: dict[str, Any],
                placeholders: dict[str, Any], replace: bool) -> StepSave:
        """Captures ``state`` now: each stateful object's ``get_state()`` is called here.

        Raises:
          UnsupportedLeafError: A ``get_state()`` value keepax does not store.
        """
        tree, iterators = stateful.state_tree(state, step)
        return cls(step=step, name=name, path=path, tree=tree, temporary=temporary, time=now,
                   started=time.time(), metrics=metrics, metadata=metadata,
                   placeholders=placeholders, iterators=iterators, replace=replace)

    def manifest_metadata(self) -> dict[str, Any]:
        """The checkpoint's metadata: the manager's facts and the user's metadata."""
        facts = {
            "version": SCHEMA,
            "step": self.step,
            "temporary": self.temporary,
            "time": self.time,
            "started": self.started,
            "metrics": self.metrics,
            "placeholders": self.placeholders,
            "iterators": self.iterators,
        }
        return {MANAGER_KEY: facts, USER_KEY: self.metadata}

    def in_flight(self) -> StepInfo:
        """What the index knows of the step while it is being saved."""
        return StepInfo(
            step=self.step, name=self.name, path=self.path, temporary=self.temporary,
            time=self.time, created=self.started, duration=None, nbytes=0,
            metrics=types.MappingProxyType(self.metrics),
            metadata=types.MappingProxyType(self.metadata),
            placeholders=types.MappingProxyType(self.placeholders),
        )

    def prepare(self, *, storage_options: dict[str, Any] | None, host_local: bool,
                timeout: float, store: ChunkStore | None = None,
                compression: str | tuple[str, int] | None = None) -> checkpoint.PreparedSave:
        """Prepares the checkpoint's write (in a multi-process run, agreed by all).

        Raises:
          CheckpointExistsError: The name is taken by an entry that is not one of the
            manager's steps.
          KeepaxError: Any other failure, naming the step.
        """
        try:
            prepared = checkpoint.prepare_save(
                self.path, self.tree, metadata=self.manifest_metadata(),
                storage_options=storage_options,
                # With host_local, a copy of the step in this process's directory that is no
                # step (some host lacks it: a save that failed on another host) is replaced.
                overwrite=self.replace or host_local,
                host_local=host_local, step=self.step, timeout=timeout,
                compression=compression,
            )
            if store is not None and not prepared.host_local:
                prepared = dataclasses.replace(prepared, store=store)
            return prepared
        except CheckpointExistsError as e:
            raise CheckpointExistsError(
                f"the name {self.name!r} is taken by an entry that is not one of this manager's "
                "steps (skipped with a warning); move it away, change the name template, "
                "or pass overwrite=True to replace it",
                path=self.path, step=self.step,
            ) from e
        except KeepaxError as e:
            if e.step is None:
                e.step = self.step
            raise


class Saver:
    """Saves steps: what :meth:`CheckpointManager.save` does once it is allowed to write.

    Args:
      options: The manager's options.
      storage: The manager directory's storage.
      index: The step index (steps in flight are noted there; committed ones recorded).
      decider: The save decision.
      preemption: Notes the step that answers a preemption signal.
      engine: Stages and writes (in the background with ``async_save``).
      background: Keeps background errors; raised before each save.
      retention: Applied after each commit.
    """

    def __init__(self, options: Options, storage: Storage, index: StepIndex,
                 decider: SaveDecider, preemption: Preemption, engine: async_engine.SaveEngine,
                 background: Background, retention: Retention) -> None:
        self._options = options
        self._storage = storage
        self._index = index
        self._decider = decider
        self._preemption = preemption
        self._engine = engine
        self._background = background
        self._retention = retention
        self.store: ChunkStore | None = None
        """The chunk store of incremental saves (None: every chunk is written)."""

    def save(self, request: SaveRequest) -> bool:
        """Decides, then writes ``request.state`` as its step; returns whether it is written.

        Raises:
          As :meth:`CheckpointManager.save`.
        """
        self._background.raise_errors()
        request.check()
        step = check_step(request.step)
        name = self._options.names.format(step, dict(request.placeholders))
        decision, preempted = self._decider.decide_save(step, request.event, request.force)
        act = functools.partial(plan_action, step, decision, force=request.force,
                                overwrite=request.overwrite, where=self._storage.display(""))
        replaced = act(self._index.view())
        if isinstance(replaced, StepInfo) and replaced is self._index.pending(step):
            # Replacing a step still being saved (overwrite, or a temporary made permanent):
            # once that save is committed (or failed).
            self._engine.wait()
            self._background.raise_errors()
            replaced = act(self._index.view())
        if preempted:
            self._preemption.saved_at = step
        if replaced is None:
            return False
        where = self._storage.display(name)
        notify = Notify(step, where, request.on_commit, self._background)
        previous = replaced if isinstance(replaced, StepInfo) else None
        try:
            state = casting.cast_floating(request.state, request.dtype,
                                          is_leaf=stateful.is_stateful)
            job = StepSave.capture(
                state, step=step, name=name, path=where,
                temporary=decision == policies.Decision.TEMPORARY, now=self._options.now(),
                metrics=check_metrics(request.metrics, step, where),
                metadata=checkpoint.check_metadata(request.metadata, where, step),
                placeholders={k: json_value(v) for k, v in request.placeholders.items()},
                replace=previous is not None and previous.name == name,
            )
            self._write(job, previous, notify)
        except Exception as e:
            notify(e)  # a failure raised here: the callback hears of it too
            raise
        return True

    def _write(self, job: StepSave, replaced: StepInfo | None, notify: Notify) -> None:
        """Stages ``job`` (before returning) and has it written and committed, then
        :meth:`_committed` called, on the engine's writer thread."""
        # The writer holds this object weakly: a manager dropped unclosed is still collected
        # (and its lock released); its saves in flight still commit (a new manager on the same
        # directory waits for them), with no bookkeeping left to do. The callbacks hold no
        # state tree, so the staged arrays are the only copy kept until the commit.
        saver = weakref.ref(self)
        step, name, path = job.step, job.name, job.path

        def committed(_: checkpoint.SaveResult) -> None:
            me = saver()
            if me is not None:
                me._committed(step, name, path, replaced)
            notify(None)

        def failed(error: KeepaxError) -> None:
            me = saver()
            if me is not None:
                me._index.forget_pending(step)
                me._background.report(error)
            notify(error)

        options = self._options
        self._index.add_pending(job.in_flight())
        try:
            self._engine.save(
                functools.partial(job.prepare, storage_options=options.storage_options,
                                  host_local=options.host_local, timeout=options.sync_timeout,
                                  store=self.store, compression=options.compression),
                step=step,
                path=path,
                max_in_flight=options.max_in_flight,
                staging_budget_bytes=options.staging_budget_bytes,
                background=options.async_save,
                on_commit=committed,
                on_error=failed,
                check=self._background.raise_errors,
            )
        except BaseException:
            self._index.forget_pending(step)
            raise

    def _committed(self, step: int, name: str, path: str, replaced: StepInfo | None) -> None:
        """Once ``step`` is committed (on the writer thread): records it, then deletes what
        retention says (hidden now, files removed in the background)."""
        self._index.committed(step, name, path)
        self._retention.after_commit(name, replaced)
