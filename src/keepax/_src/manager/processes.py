"""What the processes of a multi-process run agree on: the save decision and the steps held.

In a ``jax.distributed`` run every process builds the manager and makes the same calls.
Process 0 (the *leader*) holds the directory lock, removes leftovers and deletes steps; save
decisions are taken by process 0 and shared, given a preemption signal seen by any process, so
every process saves the same steps even when their clocks differ. With ``host_local`` every
process has its own directory and leads it; a step counts as held once every process holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keepax import policies
from keepax._src.commit import coordination
from keepax._src.manager.index import StepInfo

__all__ = ["Processes"]


class Processes:
    """This process's place in the run, and the manager's collectives.

    Args:
      host_local: Whether each process saves into its own directory.
      timeout: Seconds a process waits for the others.
      where: The manager's directory, for error messages.
    """

    def __init__(self, *, host_local: bool, timeout: float, where: str) -> None:
        self._coord = coordination.current()
        self.multi = self._coord.process_count > 1
        self.index = self._coord.process_index
        self.host_local = host_local
        self.leader = not self.multi or host_local or self._coord.process_index == 0
        self._timeout = timeout
        self._where = where

    def _sync(self, step: int | None = None) -> dict[str, Any]:
        return {"timeout": self._timeout, "step": step, "path": self._where}

    def barrier(self, name: str) -> None:
        """Waits until every process reached ``name`` (nothing in a single-process run)."""
        if self.multi:
            self._coord.barrier(name, **self._sync())

    def shared_decision(
        self, step: int, decide: Callable[[bool], policies.Decision], preempted: bool
    ) -> tuple[bool, policies.Decision]:
        """Process 0's save decision, given a preemption signal on any process.

        Args:
          step: The step to save.
          decide: This process's decision without and with a pending preemption.
          preempted: Whether this process saw a preemption signal not yet answered.

        Returns:
          ``(whether any process was preempted, process 0's decision for that case)``.
        """
        if not self.multi:
            return preempted, decide(preempted)
        both: list[coordination.JSON] = [int(decide(p)) for p in (False, True)]
        reports = self._coord.all_gather(
            "manager.save", {"preempted": preempted, "decisions": both}, **self._sync(step)
        )
        anyone = any(_field(r, "preempted") for r in reports)
        decisions = _field(reports[0], "decisions")
        chosen = decisions[int(anyone)] if isinstance(decisions, list) else None
        if not isinstance(chosen, int):
            raise TypeError(f"malformed save decision from process 0: {reports[0]!r}")
        return anyone, policies.Decision(chosen)

    def committed_everywhere(
        self, found: dict[int, StepInfo]
    ) -> tuple[dict[int, StepInfo], list[StepInfo]]:
        """With ``host_local`` in a multi-process run: the steps every process holds, and this
        process's steps newer than all of those (held here but not everywhere)."""
        if not (self.multi and self.host_local):
            return found, []
        mine: list[coordination.JSON] = [*sorted(found)]
        lists = self._coord.all_gather("manager.steps", mine, **self._sync())
        common = set(found).intersection(*(set(_steps(s)) for s in lists))
        latest = max(common, default=-1)
        newer = [r for s, r in sorted(found.items()) if s not in common and s > latest]
        return {s: r for s, r in found.items() if s in common}, newer


def _field(report: coordination.JSON, key: str) -> coordination.JSON:
    if not isinstance(report, dict):
        raise TypeError(f"malformed report from another process: {report!r}")
    return report.get(key)


def _steps(value: coordination.JSON) -> list[int]:
    if not isinstance(value, list) or not all(type(s) is int for s in value):
        raise TypeError(f"malformed step list from another process: {value!r}")
    return [s for s in value if isinstance(s, int)]
