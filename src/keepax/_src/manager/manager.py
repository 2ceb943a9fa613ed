"""CheckpointManager: many steps of one run in one directory.

A *step* is one keepax checkpoint (a directory written by :func:`keepax.save`) under the
manager's directory, named from a template; the manager's facts about it live in its manifest
(:mod:`.index`). :class:`CheckpointManager` is a facade over these parts:

- :mod:`.options`: the options, checked, and the configuration round trip;
- :mod:`.parts`: opening the directory (lock, leftovers, first scan) and closing it;
- :mod:`.index`: the step index (the directory's steps, read from their manifests);
- :mod:`.decision`: the save decision, asking the pure :mod:`keepax.policies`;
- :mod:`.saving`: the write path (decide, capture the state, stage, commit, record, prune);
- :mod:`.stateful`: objects with ``get_state``/``set_state``, and restoring a step's tree;
- :mod:`.retention`: deletion (keep policies, hiding, background removal, leftovers);
- :mod:`.processes`: what the processes of a multi-process run agree on;
- :mod:`.run_metadata`: the run-level metadata file;
- :mod:`.preemption`: the SIGTERM/SIGINT flag;
- :mod:`.foreign`: directories holding Orbax checkpoints instead of keepax steps.

**Saving.** ``save(step, state)`` writes the step when the save policy says so, with
``force=True``, or at the first call after a preemption signal, and returns whether it wrote.
By default it returns once the state is staged (the caller may then donate or mutate its
arrays): ``save`` captures the state in the caller's thread (iterator states, Python values;
arrays staged by :mod:`keepax._src.async_engine.engine`), the engine's writer thread writes and
commits it, then the :class:`.saving.Saver` records the step and applies retention. A failure
is raised, naming the step, by the next ``save``, ``wait_until_finished``,
``check_for_errors`` or ``close`` (that step is never committed). Decisions made while saves
are in flight see those steps as held; methods that report steps (``all_steps``,
``restore``, ...) first wait for them; ``save``, ``should_save`` and ``reached_preemption``
do not.

**Older steps.** Steps must increase (:class:`~keepax.errors.StepOrderError`). To go on from an
older step k, ``restore(step=k, discard_newer=True)`` deletes the steps after k (as CLU does
after preemption); without it, older steps are restored read-only.

**Keeping.** After each commit the keep policies (``policies.plan``) pick the steps to delete;
the newest step is never deleted, temporaries go once superseded, and steps the manager cannot
read (foreign files, corrupt steps) are never touched. Errors of background deletions are
raised like those of saves.

**Many processes.** In a ``jax.distributed`` run every process builds the manager and makes
the same calls; process 0 holds the lock, deletes steps and takes the save decisions, which
every process follows (README, *Many processes*).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from keepax import policies
from keepax._src import checkpoint
from keepax._src.async_engine import engine as async_engine
from keepax._src.checkpoint.per_process import PerProcessChoice
from keepax._src.manager import run_metadata, stateful
from keepax._src.manager.decision import check_event
from keepax._src.manager.index import MANAGER_KEY, StepInfo, no_best_error
from keepax._src.manager.naming import DEFAULT_TEMPLATE
from keepax._src.manager.options import DEFAULT_GRACE, Options, args_from_config, check_step
from keepax._src.manager.parts import Parts
from keepax._src.manager.saving import CommitCallback, SaveRequest

__all__ = ["CheckpointManager", "StepInfo", "MANAGER_KEY"]


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

    The module docs tell how saving, older steps, keeping and many processes work; README,
    *Managing the steps of a run*, tells more.

    Args:
      directory: Local directory (created if missing), ``memory://name``, or an object
        store URL such as ``s3://bucket/run`` (README, *Object storage*).
      save_policy: When to save (a :mod:`keepax.policies` save policy); None: every call.
      keep: Keep policies, e.g. ``[KeepLast(3), KeepBest(2, "loss")]``; empty keeps all.
      best: ``(metric, mode)`` defining :meth:`best_step`; default: the first KeepBest's.
      template: Step directory names, e.g. ``"{step:08d}"`` or ``"step_{step}_e{epoch}"``.
      preemption: Install SIGTERM/SIGINT handlers: the next ``save`` after a signal writes.
      discard_newer: Default of :meth:`restore`'s ``discard_newer``.
      read_only: Open without the directory lock, to list and restore only.
      staging_grace: Seconds before leftovers of interrupted saves are removed at start.
      clock: Returns the time in seconds (default ``time.time``), as policies see it.
      async_save: Save in the background (default); False: ``save`` commits, then returns.
      max_in_flight: At most this many saves staged or being written at once.
      staging_budget_bytes: At most this many staged bytes not yet written (None: no limit).
      storage_options: fsspec/s3fs and ``keepax_*`` options for a directory URL.
      host_local: Each process of a multi-process run saves into its own directory.
      sync_timeout: Seconds a process waits for the others (multi-process runs).
      metadata: Run-level metadata (a JSON-able dict) kept with the directory.
      keep_previous_temporary: Keep the temporaries a previous run left, as permanent steps.
      incremental: Write only the chunks no committed step here already stores
        (single-process managers only).

      Each option in full: :class:`keepax._src.manager.options.Options`.

    Raises:
      PolicyError: An invalid policy, template or option.
      DirectoryLockedError: Another manager holds the directory (the message names its host
        and PID).
      CheckpointNotFoundError: ``read_only=True`` and the local directory does not exist.
      KeepaxError: The directory holds Orbax checkpoints and no keepax steps (import them).
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
        staging_grace: float = DEFAULT_GRACE,
        clock: Callable[[], float] | None = None,
        async_save: bool = True,
        max_in_flight: int = 1,
        staging_budget_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        host_local: bool = False,
        sync_timeout: float = 600.0,
        metadata: dict[str, Any] | None = None,
        keep_previous_temporary: bool = False,
        incremental: bool = False,
        compression: str | tuple[str, int] | None = None,
    ) -> None:
        self._directory = os.fspath(directory)
        self._opts = Options.build(
            save_policy=save_policy, keep=keep, best=best, template=template,
            preemption=preemption, discard_newer=discard_newer, read_only=read_only,
            staging_grace=staging_grace, clock=clock, async_save=async_save,
            max_in_flight=max_in_flight, staging_budget_bytes=staging_budget_bytes,
            storage_options=storage_options, host_local=host_local, sync_timeout=sync_timeout,
            metadata=metadata, keep_previous_temporary=keep_previous_temporary,
            incremental=incremental, compression=compression,
        )
        parts = self._parts = Parts(self, self._directory, self._opts)
        self._index, self._engine, self._background = parts.index, parts.engine, parts.background

    # -- configuration ---------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The manager's configuration as a JSON-able dict (see :meth:`from_config`).

        Raises:
          PolicyError: A policy cannot describe itself (a custom one without ``to_config``).
        """
        return self._opts.to_config(self._directory)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> CheckpointManager:
        """Builds a manager from :meth:`to_config`'s dict (after a JSON round trip too), with
        ``overrides`` of constructor arguments (e.g. ``read_only=True``, ``clock=...``,
        ``storage_options=...``, ``metadata=...``). PolicyError: an unknown or invalid field."""
        args = args_from_config(config, overrides)
        return cls(args.pop("directory"), **args)

    # -- what is there -------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The manager's directory, as given."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Every step held (committed, readable), ascending; temporaries included. Waits for
        saves in flight first."""
        self._engine.wait()
        return sorted(self._index.held())

    def latest_step(self) -> int | None:
        """The highest step held, or None. Waits for saves in flight first."""
        self._engine.wait()
        return max(self._index.held(), default=None)

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
        if self._opts.best is None:
            raise no_best_error()
        self._engine.wait()
        return self._index.best_step(*self._opts.best)

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        self._engine.wait()
        return dict(self._index.get(step).metrics)

    def metadata(self, step: int) -> StepInfo:
        """What is known about ``step`` without reading arrays: user metadata, time, duration,
        size, temporary, metrics, name and path."""
        self._engine.wait()
        return self._index.get(step)

    def item_metadata(self, step: int | str | None = None) -> Any:
        """The structure of a step's state, with a :class:`keepax.LeafInfo` (type, shape, dtype,
        size) at each leaf; no array data is read."""
        self._parts.check_open()
        self._engine.wait()
        record = self._index.resolve(step, self._opts.best)
        return checkpoint.open_checkpoint(record.path, storage_options=self._opts.storage_options
                                          ).info.tree

    def should_save(self, step: int, *, event: str | None = None) -> bool:
        """Whether ``save(step, ...)`` would write now (by policy or a pending preemption), so
        that an expensive state is built only then; with ``event``, whether
        ``event(event, step, ...)`` would (counting that occurrence, as it will). False for
        a step below the latest (``save`` would raise) or already saved, unless a temporary
        there would become permanent. In a multi-process run, this process's own answer.

        Raises:
          PolicyError: ``step`` is not a non-negative int, or an unknown event name.
        """
        return self._parts.decider.would_write(check_step(step), event)

    def run_metadata(self) -> dict[str, Any]:
        """The run-level metadata kept with the directory (``metadata=`` when a manager was
        built on it), independent of any step; ``{}`` if there is none.

        Raises:
          CorruptCheckpointError: The stored file is not a run metadata file.
        """
        self._parts.check_open()
        stored = run_metadata.read(self._parts.storage)
        return {} if stored is None else stored

    def plan_deletions(self) -> policies.RetentionPlan:
        """What the keep policies would delete now (a dry run): ``plan.delete``, ``plan.keep``,
        and ``print(plan.describe())`` for the reasons. Waits for saves in flight first."""
        self._engine.wait()
        return self._parts.retention.plan()

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption signal arrived and a save at ``step`` or before has run since:
        the loop should exit now."""
        saved_at = self._parts.preemption.saved_at
        return saved_at is not None and check_step(step) >= saved_at

    def notify_preemption(self) -> None:
        """Acts as if SIGTERM had arrived (for your own signal handling, and for tests)."""
        self._parts.preemption.notify()

    def reload(self) -> None:
        """Re-reads the directory (another process may have written or deleted steps)."""
        self._parts.check_open()
        self._engine.wait()
        self._parts.scan()

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
        dtype: Any = None,
        on_commit: CommitCallback | None = None,
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
          dtype: Store each floating-point JAX/NumPy array as this dtype (``jnp.bfloat16``);
            other leaves and ``get_state()`` states are stored as they are.
          on_commit: ``on_commit(step, error)``, called once if the step is written: with
            None once it is committed, else with the error of its save (README, *Commit
            notifications*: threads, processes, what it may call).
          **placeholders: Values of the name template's placeholders (e.g. ``epoch=3``).

        Returns:
          Whether the step is written: with ``async_save`` (the default), it is staged when
          ``save`` returns (the caller may donate or change its arrays) and committed in the
          background; otherwise committed.

        Raises:
          StepOrderError: ``step`` is below the latest step (see the class docs); also a
            ``ValueError``.
          CheckpointExistsError: ``force=True`` for a step already held, without ``overwrite``.
          ManagerClosedError: The manager is closed.
          KeepaxError: The metrics are not finite numbers, ``dtype`` is not a floating-point
            dtype, an earlier background save or deletion failed (the error names its step;
            this save is not made), or the manager is read-only.
          PolicyError: Missing or unknown placeholders.
        """
        self._parts.check_writable("save")
        return self._parts.saver.save(SaveRequest(step, state, None, metrics, metadata, force,
                                            overwrite, placeholders, dtype, on_commit))

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
        dtype: Any = None,
        on_commit: CommitCallback | None = None,
        **placeholders: Any,
    ) -> bool:
        """Reports a lifecycle event (``"epoch_end"``, ``"phase_start"``, ...; see
        :data:`keepax.policies.LIFECYCLE_EVENTS`) and saves if the policy says so, e.g. with
        ``save_policy=policies.OnEvents(["epoch_end"], every_n=2)``. Occurrences are counted
        per event name. Otherwise as :meth:`save`.

        Raises:
          PolicyError: An unknown event name.
        """
        check_event(name)
        self._parts.check_writable("event")
        self._parts.decider.count_event(name)
        return self._parts.saver.save(SaveRequest(step, state, name, metrics, metadata, force,
                                            overwrite, placeholders, dtype, on_commit))

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
        stats: checkpoint.RestoreStats | None = None,
        per_process: PerProcessChoice = None,
    ) -> Any:
        """Restores a step (its manifest is read once).

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
          per_process: Which copy of per-process values (a multi-process run's iterator
            states) to restore: None, ``k`` or ``"all"``, as for :func:`keepax.restore`.

        Raises:
          CheckpointNotFoundError: No such step (the message lists those held).
          TreeMismatchError: ``like`` does not match the step.
          ManagerClosedError: The manager is closed.
          KeepaxError: A per-process value saved by another number of processes, and
            ``per_process`` does not say which copy to take (the error names the leaf).
        """
        self._parts.check_open()
        self._engine.wait()
        if discard_newer is None:
            discard_newer = self._opts.discard_newer
        if discard_newer:
            self._parts.check_writable("restore(discard_newer=True)")
        record = self._index.resolve(step, self._opts.best)
        result = stateful.restore_step(record.path, record.step, self._opts.storage_options, like,
                                       items, partial, dtype, stats, per_process)
        if discard_newer:
            self._parts.discard_after(record.step)
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

    # -- deleting, background work and lifetime ----------------------------------------------

    def delete(self, step: int) -> None:
        """Deletes a step (its files are removed in the background; see
        :meth:`wait_until_finished`)."""
        self._parts.check_writable("delete")
        self._engine.wait()
        self._parts.retention.discard([self._index.get(step)], raise_now=True)

    def wait_until_finished(self) -> None:
        """Waits for saves in flight to be committed and for background deletions; raises the
        errors of background work."""
        self._engine.wait()
        self._background.wait()
        self.check_for_errors()

    def check_for_errors(self) -> None:
        """Raises the first error of finished background work, if any (once).

        Raises:
          KeepaxError: A background save or deletion failed (the error names the step and
            path; more failures are listed in its notes).
        """
        self._background.raise_errors()

    def close(self) -> None:
        """Waits for saves in flight and background deletions, releases the directory lock
        and the signal handlers, then raises any background error. Idempotent."""
        self._parts.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._parts.close(exc)

    def __repr__(self) -> str:
        steps = self.all_steps()
        shown = f"{len(steps)} steps" + (f", latest {steps[-1]}" if steps else "")
        mode = ", read_only" if self._opts.read_only else ""
        return f"CheckpointManager({self._directory!r}: {shown}{mode})"
