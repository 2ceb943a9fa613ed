"""What to keep: pure keep policies over the records of the steps held, and the retention
plan that unites them."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from keepax._src.policies.checks import as_step, choice, is_real, positive_int
from keepax.errors import PolicyError

# ---------------------------------------------------------------------------------------------
# What to keep.


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What the keep policies know about one saved checkpoint.

    Attributes:
      step: The step, a non-negative int.
      time: When it was saved, in seconds on the manager's clock.
      temporary: Whether it is a temporary checkpoint (see :class:`EveryInterval`).
      metrics: The metrics saved with it, stored as a read-only copy. A value that is not a
        real number (or is NaN) counts as missing for :class:`KeepBest`.

    Raises:
      PolicyError: ``step`` is not a non-negative int, ``time`` is not a number,
        ``temporary`` is not a bool, or ``metrics`` is not a mapping with string keys.
    """

    step: int
    time: float
    temporary: bool = False
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", as_step(self.step, "StepRecord.step"))
        if not is_real(self.time):
            raise PolicyError(
                f"StepRecord.time must be a number of seconds, got {self.time!r} "
                f"(step {self.step})."
            )
        if not isinstance(self.temporary, bool):
            raise PolicyError(
                f"StepRecord.temporary must be True or False, got {self.temporary!r} "
                f"(step {self.step})."
            )
        metrics = self.metrics
        if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
            raise PolicyError(
                f"StepRecord.metrics must map metric names (str) to numbers, got {metrics!r} "
                f"(step {self.step})."
            )
        object.__setattr__(self, "metrics", types.MappingProxyType(dict(metrics)))


@runtime_checkable
class KeepPolicy(Protocol):
    """What :func:`plan` needs from a keep policy (the built-in ones and your own)."""

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """Returns the steps to keep among ``records`` (sorted by step), each with a reason."""
        ...

    def to_config(self) -> dict[str, Any]:
        """Returns a JSON-able dict with a ``"type"`` field (built-in policies only)."""
        ...


def _permanent(records: Sequence[StepRecord]) -> list[StepRecord]:
    return [r for r in records if not r.temporary]


@dataclasses.dataclass(frozen=True)
class KeepLast:
    """Keeps the ``n`` newest (highest-step) permanent checkpoints.

    Attributes:
      n: How many, at least 1.

    Raises:
      PolicyError: ``n`` is not an int of at least 1.
    """

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", positive_int(self.n, "KeepLast(n)", "KeepLast(3)"))

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """The ``n`` highest permanent steps, each with reason ``"last {n}"``."""
        steps = sorted((r.step for r in _permanent(records)), reverse=True)[: self.n]
        return {step: f"last {self.n}" for step in sorted(steps)}

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "keep_last", "n": n}``."""
        return {"type": "keep_last", "n": self.n}


@dataclasses.dataclass(frozen=True)
class KeepEvery:
    """Keeps, forever, every permanent checkpoint whose step is a multiple of ``k``.

    Attributes:
      k: The interval in steps, at least 1.

    Raises:
      PolicyError: ``k`` is not an int of at least 1.
    """

    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", positive_int(self.k, "KeepEvery(k)", "KeepEvery(1000)"))

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """The permanent steps with ``step % k == 0``, each with reason ``"every {k}"``."""
        return {r.step: f"every {self.k}" for r in _permanent(records) if r.step % self.k == 0}

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "keep_every", "k": k}``."""
        return {"type": "keep_every", "k": self.k}


@dataclasses.dataclass(frozen=True)
class KeepTimeInterval:
    """Keeps, forever, one permanent checkpoint per ``seconds`` of time (Orbax's
    ``keep_time_interval``): e.g. ``KeepTimeInterval(3600)`` keeps one step per hour.

    Going through the permanent steps in step order, it keeps the first, then each step saved
    at least ``seconds`` after the last one it kept (by :attr:`StepRecord.time`, the manager's
    clock when the step was saved). Which steps it keeps never changes as newer steps come or
    as steps it does not keep are deleted, so the steps it keeps stay kept. Combine it with
    the other keep policies (the union is kept), e.g. ``[KeepLast(3), KeepTimeInterval(3600)]``.

    Attributes:
      seconds: The interval, a finite number greater than 0.

    Raises:
      PolicyError: ``seconds`` is not a finite number greater than 0.

    Example:
      >>> records = [StepRecord(s, time=600.0 * s) for s in range(8)]  # every 10 minutes
      >>> sorted(KeepTimeInterval(1800).keep(records))
      [0, 3, 6]
    """

    seconds: float

    def __post_init__(self) -> None:
        seconds = self.seconds
        if not is_real(seconds) or not math.isfinite(seconds) or seconds <= 0:
            raise PolicyError(
                f"KeepTimeInterval(seconds) must be a finite number of seconds greater than 0, "
                f"got {seconds!r}; pass e.g. KeepTimeInterval(3600) to keep one step per hour."
            )
        object.__setattr__(self, "seconds", float(seconds))

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """The first permanent step, then each one ``seconds`` after the last kept, with
        reason ``"one per {seconds}s"``."""
        reason = f"one per {self.seconds:g}s"
        out: dict[int, str] = {}
        last: float | None = None
        for record in sorted(_permanent(records), key=lambda r: r.step):
            if last is None or record.time - last >= self.seconds:
                out[record.step] = reason
                last = record.time
        return out

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "keep_time_interval", "seconds": seconds}``."""
        return {"type": "keep_time_interval", "seconds": self.seconds}


def _metric_value(value: Any) -> float | None:
    """``value`` as a float, or None if it is missing, not a real number, or NaN."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if math.isnan(number) else number


@dataclasses.dataclass(frozen=True)
class KeepBest:
    """Keeps the ``n`` best permanent checkpoints by one metric.

    Ties are broken in favour of the newer step. A record whose ``metrics`` lack ``metric``
    (or hold a value that is not a real number, or NaN) is left out of the ranking; with
    ``missing="keep"`` it is kept anyway, with ``missing="drop"`` (the default) it is left to
    the other policies.

    Attributes:
      n: How many, at least 1.
      metric: The metric's name in :attr:`StepRecord.metrics`.
      mode: ``"min"`` (lower is better) or ``"max"``.
      missing: ``"drop"`` or ``"keep"``: what to do with records lacking the metric.

    Raises:
      PolicyError: ``n`` not an int of at least 1, an empty metric name, or a bad ``mode``
        or ``missing``.
    """

    n: int
    metric: str
    mode: Literal["min", "max"] = "min"
    missing: Literal["drop", "keep"] = "drop"

    def __post_init__(self) -> None:
        example = "KeepBest(3, 'loss', mode='min')"
        object.__setattr__(self, "n", positive_int(self.n, "KeepBest(n)", example))
        if not isinstance(self.metric, str) or not self.metric:
            raise PolicyError(
                f"KeepBest(metric) must be a non-empty metric name, got {self.metric!r}; pass "
                f"e.g. {example}."
            )
        choice(self.mode, "KeepBest(mode)", ("min", "max"))
        choice(self.missing, "KeepBest(missing)", ("drop", "keep"))

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """The ``n`` best permanent steps (``"best {n} by {metric} ({mode})"``), plus those
        lacking the metric when ``missing="keep"``."""
        sign = 1.0 if self.mode == "min" else -1.0
        ranked: list[tuple[float, int]] = []
        lacking: list[int] = []
        for record in _permanent(records):
            value = _metric_value(record.metrics.get(self.metric))
            if value is None:
                lacking.append(record.step)
            else:
                ranked.append((sign * value, -record.step))
        ranked.sort()
        out = {-neg_step: f"best {self.n} by {self.metric} ({self.mode})"
               for _, neg_step in ranked[: self.n]}
        if self.missing == "keep":
            for step in lacking:
                out[step] = f"no {self.metric} metric (missing='keep')"
        return dict(sorted(out.items()))

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "keep_best", "n", "metric", "mode", "missing"}`` (with values)."""
        return {"type": "keep_best", "n": self.n, "metric": self.metric, "mode": self.mode,
                "missing": self.missing}


@dataclasses.dataclass(frozen=True)
class KeepAll:
    """Keeps every permanent checkpoint (temporaries still go once superseded)."""

    def keep(self, records: Sequence[StepRecord]) -> dict[int, str]:
        """Every permanent step, with reason ``"all"``."""
        return {r.step: "all" for r in _permanent(records)}

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "keep_all"}``."""
        return {"type": "keep_all"}


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """Which checkpoints to keep and which to delete, and why: the result of :func:`plan`.

    Attributes:
      keep: The steps to keep, sorted.
      delete: The steps to delete, sorted. ``keep`` and ``delete`` partition the records.
      reasons: For each kept step, why (the reasons of every policy that keeps it, joined by
        ``"; "``), e.g. ``"last 3; best 2 by loss (min)"`` or ``"temporary (newest)"``.
    """

    keep: tuple[int, ...]
    delete: tuple[int, ...]
    reasons: Mapping[int, str] = dataclasses.field(hash=False)

    def describe(self) -> str:
        """One line per step, in step order: ``keep   <step>: <reason>`` or ``delete <step>``."""
        lines = [f"keep   {step}: {self.reasons[step]}" for step in self.keep]
        lines += [f"delete {step}" for step in self.delete]
        return "\n".join(lines)


_NO_POLICY_REASON = "no keep policy"


def plan(records: Iterable[StepRecord], keep_policies: Iterable[KeepPolicy]) -> RetentionPlan:
    """Decides which checkpoints to keep: pure and deterministic (input order does not matter).

    Rules, in order:

    1. A step is kept if *any* policy keeps it (the union).
    2. An empty policy list means no retention is configured: every permanent step is kept.
    3. A temporary checkpoint is kept only while it is the newest step; once any newer
       checkpoint (temporary or permanent) exists it is deleted, whatever the policies say
       (including one left by a previous run that is older than a new permanent step).
    4. The newest step (the highest step number among ``records``) is always kept.

    Args:
      records: One record per checkpoint, with distinct steps. The manager passes every
        committed checkpoint it holds.
      keep_policies: The keep policies, e.g. ``[KeepLast(3), KeepEvery(10_000)]``.

    Returns:
      The plan; ``describe()`` renders it for a dry run.

    Raises:
      PolicyError: A record is not a :class:`StepRecord`, two records share a step, a policy
        is not a keep policy, or a policy's ``keep`` returned something other than a mapping.
    """
    by_step: dict[int, StepRecord] = {}
    for record in records:
        if not isinstance(record, StepRecord):
            raise PolicyError(f"plan takes StepRecord objects, got {record!r}.")
        if record.step in by_step:
            raise PolicyError(
                f"plan got two records for step {record.step}; pass one record per checkpoint.",
                step=record.step,
            )
        by_step[record.step] = record
    if callable(getattr(keep_policies, "keep", None)):
        raise PolicyError(
            "plan takes a list of keep policies; wrap the single policy in a list, as in "
            "plan(records, [KeepLast(3)])."
        )
    policies = list(keep_policies)
    for policy in policies:
        if not callable(getattr(policy, "keep", None)):
            raise PolicyError(
                f"{policy!r} is not a keep policy: it needs a keep(records) method, like "
                "KeepLast(3) or KeepBest(1, 'loss')."
            )
    if not by_step:
        return RetentionPlan(keep=(), delete=(), reasons=types.MappingProxyType({}))

    ordered = tuple(by_step[s] for s in sorted(by_step))
    newest = ordered[-1].step
    reasons: dict[int, list[str]] = {}

    def add(step: int, reason: str) -> None:
        record = by_step.get(step)
        if record is None or (record.temporary and step != newest):
            return  # not a checkpoint we hold, or a superseded temporary
        why = reasons.setdefault(step, [])
        if reason not in why:
            why.append(reason)

    if not policies:
        for record in ordered:
            add(record.step, _NO_POLICY_REASON)
    for policy in policies:
        kept = policy.keep(ordered)
        if not isinstance(kept, Mapping):
            raise PolicyError(
                f"{type(policy).__name__}.keep returned {kept!r}; a keep policy must return a "
                "dict mapping each step to keep to a reason."
            )
        for step, reason in sorted(kept.items()):
            add(step, str(reason))
    add(newest, "temporary (newest)" if by_step[newest].temporary else "newest")

    keep = tuple(sorted(reasons))
    delete = tuple(s for s in sorted(by_step) if s not in reasons)
    text = {step: "; ".join(reasons[step]) for step in keep}
    return RetentionPlan(keep=keep, delete=delete, reasons=types.MappingProxyType(text))


