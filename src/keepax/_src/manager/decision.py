"""The save decision, taken in one place.

The policies are pure (:func:`keepax.policies.decide`); :class:`SaveDecider` gathers the facts
they see (the clock, the steps held or being saved, event counts, a pending preemption, process
0's decision in a multi-process run), and :func:`plan_action` turns a decision into what a
``save`` does with the steps already held: skip, write, or replace one.
"""

from __future__ import annotations

import collections

from keepax import policies
from keepax._src.manager.index import StepIndex, StepInfo
from keepax._src.manager.options import Options
from keepax._src.manager.preemption import Preemption
from keepax._src.manager.processes import Processes
from keepax.errors import CheckpointExistsError, PolicyError, StepOrderError

__all__ = ["SaveDecider", "check_event", "plan_action"]


def check_event(name: str) -> None:
    """PolicyError unless ``name`` is one of :data:`keepax.policies.LIFECYCLE_EVENTS`."""
    if name not in policies.LIFECYCLE_EVENTS:
        raise PolicyError(
            f"unknown event {name!r}; the lifecycle events are: "
            f"{', '.join(sorted(policies.LIFECYCLE_EVENTS))}."
        )


class SaveDecider:
    """Asks the save policy whether to save a step, with the facts of the moment.

    Args:
      options: The manager's options (its save policy and clock).
      index: The steps held and being saved.
      preemption: The preemption flag.
      processes: For process 0's decision in a multi-process run.
    """

    def __init__(self, options: Options, index: StepIndex, preemption: Preemption,
                 processes: Processes) -> None:
        self._options = options
        self._index = index
        self._preemption = preemption
        self._processes = processes
        self._event_counts: collections.Counter[str] = collections.Counter()
        self._start_time = options.now()

    def count_event(self, name: str) -> None:
        """Counts one occurrence of a lifecycle event."""
        self._event_counts[name] += 1

    def decide(self, step: int, event: str | None = None, *, preempted: bool | None = None,
               upcoming: bool = False) -> policies.Decision:
        """This process's decision for ``step`` (without a save policy: always permanent).

        Args:
          step: The step.
          event: The lifecycle event, if any.
          preempted: Whether to decide as if preempted (default: whether a signal is pending).
          upcoming: ``event`` has not been counted yet (``should_save``): decide as for its
            next occurrence.
        """
        view = self._index.view()
        times = [r.time for r in view.values()]
        count = self._event_counts[event] + int(upcoming) if event else 0
        ctx = policies.SaveContext(
            now=self._options.now(),
            last_step=max(view, default=None),
            last_save_time=max(times, default=self._start_time),
            event=event,
            event_count=count,
            preempted=self._preemption.pending if preempted is None else preempted,
            start_time=self._start_time,
        )
        if self._options.save_policy is None:
            return policies.Decision.PERMANENT
        return policies.decide(self._options.save_policy, step, ctx)

    def decide_save(self, step: int, event: str | None,
                    force: bool) -> tuple[policies.Decision, bool]:
        """The decision ``save`` acts on (process 0's in a multi-process run; permanent with
        ``force``), and whether it answers a preemption signal."""
        preempted, decision = self._processes.shared_decision(
            step, lambda p: self.decide(step, event, preempted=p),
            self._preemption.pending,
        )
        if force:
            decision = policies.Decision.PERMANENT
        return decision, preempted

    def would_write(self, step: int, event: str | None) -> bool:
        """Whether ``save(step)`` (or ``event(event, step)``, its occurrence not counted yet)
        would write now, by this process's decision: never for a step below the latest or
        already saved (unless a temporary becomes permanent).

        Raises:
          PolicyError: An unknown event name.
        """
        if event is not None:
            check_event(event)
        decision = self.decide(step, event, upcoming=True)
        try:
            action = plan_action(step, decision, self._index.view(), force=False,
                                 overwrite=False, where="")
        except StepOrderError:
            return False
        return action is not None


def plan_action(
    step: int, decision: policies.Decision, view: dict[int, StepInfo], *, force: bool,
    overwrite: bool, where: str,
) -> StepInfo | bool | None:
    """What a save of ``step`` does: None (skip), True (write a new step), or the held step to
    replace.

    Args:
      step: The step to save.
      decision: What the policy decided.
      view: The steps held and being saved.
      force: ``save(force=True)``.
      overwrite: ``save(overwrite=True)``.
      where: The manager's directory, for errors.

    Raises:
      StepOrderError: ``step`` is below the latest (unless held and ``overwrite`` replaces it).
      CheckpointExistsError: ``step`` is held and ``force`` is given without ``overwrite``.
    """
    if decision == policies.Decision.SKIP:
        return None
    held = view.get(step)
    if held is not None and overwrite:
        return held
    latest = max(view, default=None)
    if latest is not None and step < latest:
        # Whether or not this step is held: going on below the latest would mix two
        # histories (the old steps after this one would stay).
        raise StepOrderError(
            f"step {step} is below the latest step {latest}: steps must increase. To go on "
            f"from an older step k, restore it with restore(step=k, discard_newer=True) (or "
            "build the manager with discard_newer=True), which deletes the steps after k; "
            f"otherwise save steps above {latest}",
            path=where, step=step,
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
