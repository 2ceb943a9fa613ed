"""When to save and what to keep: pure policies over plain facts.

Nothing here does I/O, reads a clock or starts a thread. The
:class:`~keepax.CheckpointManager` gathers the facts (the step, its injected clock's reading,
the lifecycle event, whether a preemption signal arrived, the records of the checkpoints it
holds), asks a policy, and acts on the answer in one place.

**When to save.** A save policy has ``decide(step, ctx) -> Decision``. Call it through the
module function :func:`decide`, which validates the step and makes a preemption override every
policy:

>>> ctx = SaveContext(now=120.0, last_step=900, last_save_time=60.0)
>>> policy = AnyOf(Stages.parse("every 100 until 1000, then every 1000"), EveryInterval(600))
>>> decide(policy, 1000, ctx)
<Decision.PERMANENT: 2>
>>> decide(policy, 1100, ctx)
<Decision.SKIP: 0>
>>> decide(policy, 1100, dataclasses.replace(ctx, preempted=True))
<Decision.PERMANENT: 2>

A policy looks only at the step, the clock and the event; it does not know which steps are
already saved. The manager must not save a step twice: it skips a step it already committed
or has in flight (``ctx.last_step == step``), unless it upgrades a temporary checkpoint to a
permanent one.

**What to keep.** A keep policy has ``keep(records) -> {step: reason}``. :func:`plan` takes the
union of several and returns a :class:`RetentionPlan` (which doubles as a dry run):

>>> records = [StepRecord(s, time=float(s), metrics={"loss": 1.0 / (s + 1)})
...            for s in (0, 1000, 2000, 3000)]
>>> records.append(StepRecord(3500, time=3500.0, temporary=True))
>>> p = plan(records, [KeepLast(2), KeepBest(1, "loss", mode="min")])
>>> p.keep, p.delete
((2000, 3000, 3500), (0, 1000))
>>> print(p.describe())
keep   2000: last 2
keep   3000: last 2; best 1 by loss (min)
keep   3500: temporary (newest)
delete 0
delete 1000

**Configuration.** Every policy turns into a JSON-able dict with :meth:`to_config` and back
with :func:`policy_from_config`:

>>> import json
>>> policy_from_config(json.loads(json.dumps(policy.to_config()))) == policy
True
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import numbers
import operator
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, cast, runtime_checkable

from keepax.errors import PolicyError

__all__ = [
    # When to save.
    "Decision",
    "SaveContext",
    "SavePolicy",
    "EveryNSteps",
    "Stages",
    "AtSteps",
    "EveryInterval",
    "OnEvents",
    "AnyOf",
    "LIFECYCLE_EVENTS",
    "decide",
    # What to keep.
    "StepRecord",
    "KeepPolicy",
    "KeepLast",
    "KeepEvery",
    "KeepTimeInterval",
    "KeepBest",
    "KeepAll",
    "RetentionPlan",
    "plan",
    # Configuration.
    "policy_from_config",
]

LIFECYCLE_EVENTS: frozenset[str] = frozenset({
    "experiment_start", "experiment_end",
    "phase_start", "phase_end",
    "group_start", "group_end",
    "epoch_start", "epoch_end",
    "batch_start", "batch_end",
    "step",
})
"""The lifecycle event names :class:`OnEvents` accepts."""


# ---------------------------------------------------------------------------------------------
# Validation helpers.


def _as_int(value: Any, what: str, example: str) -> int:
    """``value`` as a Python int (NumPy and 0-d integer arrays accepted), else PolicyError."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise PolicyError(
        f"{what} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {example}."
    )


def _as_step(value: Any, what: str = "step") -> int:
    """``value`` as a non-negative int step, else PolicyError."""
    step = _as_int(value, what, "100")
    if step < 0:
        raise PolicyError(f"{what} must be non-negative, got {step}; steps count up from 0.")
    return step


def _positive_int(value: Any, what: str, example: str) -> int:
    n = _as_int(value, what, example)
    if n < 1:
        raise PolicyError(f"{what} must be at least 1, got {n}; pass e.g. {example}.")
    return n


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise PolicyError(f"{what} must be {options}, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------
# When to save.


class Decision(enum.IntEnum):
    """What a save policy decided for a step, ordered ``SKIP < TEMPORARY < PERMANENT``.

    ``SKIP`` is falsy, so ``if decision:`` reads "save". Combining policies takes the maximum.

    Attributes:
      SKIP: Do not save this step.
      TEMPORARY: Save a temporary checkpoint, deleted once any newer checkpoint exists.
      PERMANENT: Save a checkpoint that the keep policies then govern.
    """

    SKIP = 0
    TEMPORARY = 1
    PERMANENT = 2

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class SaveContext:
    """The plain facts a save policy may look at, supplied by the manager on each call.

    Attributes:
      now: The manager's injected clock, in seconds.
      last_step: The latest step committed or in flight, or ``None`` if there is none.
      last_save_time: When the last checkpoint of any kind was saved (on the same clock as
        ``now``), or ``None`` if never. For a checkpoint left by a previous run, the manager
        passes the time recorded with it. A manager that wants the first time-based save one
        interval after it starts passes its start time here instead of ``None``.
      event: The lifecycle event of an event-driven call (see :data:`LIFECYCLE_EVENTS`), or
        ``None`` for a plain ``save`` call.
      event_count: How many times ``event`` has occurred so far, this time included (so at
        least 1 when ``event`` is set). Ignored when ``event`` is ``None``.
      preempted: Whether a preemption signal arrived; :func:`decide` then saves whatever the
        policy says.
      start_time: When the manager started (same clock), or ``None``: what
        ``EveryInterval(since="start")`` counts from before this manager's first save.

    Raises:
      PolicyError: ``event`` is not a string, or ``event_count`` is not an int that is at
        least 1 for an event-driven call (at least 0 otherwise), or ``now``,
        ``last_save_time``, ``start_time`` or ``last_step`` have the wrong type.
    """

    now: float
    last_step: int | None = None
    last_save_time: float | None = None
    event: str | None = None
    event_count: int = 0
    preempted: bool = False
    start_time: float | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.now):
            raise PolicyError(f"SaveContext.now must be a number of seconds, got {self.now!r}.")
        for name in ("last_save_time", "start_time"):
            value = getattr(self, name)
            if value is not None and not _is_real(value):
                raise PolicyError(
                    f"SaveContext.{name} must be a number of seconds or None, got {value!r}."
                )
        if self.last_step is not None:
            object.__setattr__(self, "last_step", _as_step(self.last_step, "SaveContext.last_step"))
        count = _as_int(self.event_count, "SaveContext.event_count", "1")
        object.__setattr__(self, "event_count", count)
        if self.event is not None:
            if not isinstance(self.event, str):
                raise PolicyError(
                    f"SaveContext.event must be an event name or None, got {self.event!r}."
                )
            if count < 1:
                raise PolicyError(
                    f"SaveContext.event_count counts occurrences of {self.event!r} including this "
                    f"one, so it must be at least 1, got {count}."
                )
        elif count < 0:
            raise PolicyError(f"SaveContext.event_count must be non-negative, got {count}.")
        object.__setattr__(self, "preempted", bool(self.preempted))


@runtime_checkable
class SavePolicy(Protocol):
    """What the manager needs from a save policy (the built-in ones and your own)."""

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """Returns what to do at ``step`` given the facts in ``ctx``."""
        ...

    def to_config(self) -> dict[str, Any]:
        """Returns a JSON-able dict with a ``"type"`` field (built-in policies only)."""
        ...


def _checked_decision(policy: Any, result: Any) -> Decision:
    if not isinstance(result, Decision):
        raise PolicyError(
            f"{type(policy).__name__}.decide returned {result!r}; a save policy must return a "
            "Decision (Decision.SKIP, Decision.TEMPORARY or Decision.PERMANENT)."
        )
    return result


def _check_save_policy(policy: Any, what: str) -> None:
    if not callable(getattr(policy, "decide", None)):
        raise PolicyError(
            f"{what} {policy!r} is not a save policy: it needs a decide(step, ctx) method, like "
            "EveryNSteps(100) or EveryInterval(600)."
        )


@dataclasses.dataclass(frozen=True)
class EveryNSteps:
    """Saves a permanent checkpoint at every step that is a multiple of ``n`` (step 0 too).

    Attributes:
      n: The interval in steps, at least 1.

    Raises:
      PolicyError: ``n`` is not an int of at least 1.

    Example:
      >>> [s for s in range(0, 501, 50) if EveryNSteps(200).decide(s, SaveContext(now=0.0))]
      [0, 200, 400]
    """

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int(self.n, "EveryNSteps(n)", "EveryNSteps(100)"))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``step % n == 0``, else SKIP."""
        del ctx
        return Decision.PERMANENT if _as_step(step) % self.n == 0 else Decision.SKIP

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "every_n_steps", "n": n}``."""
        return {"type": "every_n_steps", "n": self.n}


_STAGES_EXAMPLE = "Stages([(100, 1000), (1000, None)])"
_STAGES_TEXT_EXAMPLE = "'every 100 until 1000, then every 1000'"


def _check_stages(stages: Any) -> tuple[tuple[int, int | None], ...]:
    if isinstance(stages, (str, bytes)):
        raise PolicyError(
            f"Stages takes (every, until) pairs such as {_STAGES_EXAMPLE}; to read text such as "
            f"{_STAGES_TEXT_EXAMPLE} use Stages.parse(...)."
        )
    try:
        items = list(stages)
    except TypeError:
        raise PolicyError(
            f"Stages takes a list of (every, until) pairs, got {stages!r}; pass e.g. "
            f"{_STAGES_EXAMPLE}."
        ) from None
    if not items:
        raise PolicyError(f"Stages needs at least one stage; pass e.g. {_STAGES_EXAMPLE}.")
    out: list[tuple[int, int | None]] = []
    previous_until = 0
    for i, item in enumerate(items, start=1):
        if isinstance(item, Mapping):
            extra = set(item) - {"every", "until"}
            if "every" not in item or extra:
                raise PolicyError(
                    f"stage {i} must have the keys 'every' and (optionally) 'until', got "
                    f"{dict(item)!r}."
                )
            every, until = item["every"], item.get("until")
        else:
            pair = tuple(item) if isinstance(item, (list, tuple)) else (item,)
            if len(pair) != 2:
                raise PolicyError(
                    f"stage {i} must be an (every, until) pair, got {item!r}; use None as the "
                    f"final stage's until to keep it going, as in {_STAGES_EXAMPLE}."
                )
            every, until = pair
        every = _positive_int(every, f"stage {i}'s every", "100")
        if until is None:
            if i != len(items):
                raise PolicyError(
                    f"stage {i} (every {every}) has no 'until' but is not the last stage; only "
                    "the final stage may be open-ended. Give it an 'until' or move it last."
                )
        else:
            until = _as_int(until, f"stage {i}'s until", "1000")
            if until <= previous_until:
                where = "the previous stage's" if i > 1 else "the first step,"
                raise PolicyError(
                    f"stage {i}'s until ({until}) must be greater than {where} {previous_until}: "
                    "'until' values must strictly increase from stage to stage."
                )
            previous_until = until
        out.append((every, until))
    return tuple(out)


_NUMBER = r"\d+(?:_\d+)*"
_STAGE_RE = re.compile(
    rf"every\s*=?\s*(?P<every>{_NUMBER})(?:\s+steps?)?"
    rf"(?:\s+until\s*=?\s*(?P<until>{_NUMBER})(?:\s+steps?)?)?",
    re.IGNORECASE,
)
_STAGE_SEPARATOR_RE = re.compile(r"\s*(?:[,;]\s*(?:then\b)?|\bthen\b)\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Stages:
    """Saves permanent checkpoints at intervals that change with the step.

    Each stage is an ``(every, until)`` pair: while ``step < until`` (and at or after the
    previous stage's ``until``) a checkpoint is saved when ``step % every == 0``. The step is
    counted from 0, not from the start of the stage. Only the final stage may have ``until``
    ``None`` (it lasts forever); without one, steps at or after the last ``until`` are skipped.

    Attributes:
      stages: The ``(every, until)`` pairs, ``until`` strictly increasing. Lists of pairs or
        of ``{"every": ..., "until": ...}`` dicts are accepted and stored as tuples.

    Raises:
      PolicyError: No stage; ``every`` not an int of at least 1; ``until`` values not
        strictly increasing (or not above 0); an open-ended stage that is not the last.

    Example:
      >>> policy = Stages([(100, 1000), (1000, None)])
      >>> [s for s in (0, 100, 950, 1000, 1100, 2000) if policy.decide(s, SaveContext(now=0.0))]
      [0, 100, 1000, 2000]
      >>> str(policy)
      'every 100 until 1000, then every 1000'
    """

    stages: tuple[tuple[int, int | None], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", _check_stages(self.stages))

    @classmethod
    def parse(cls, text: str) -> Stages:
        """Reads stages written as ``"every 100 until 1000, then every 1000"``.

        Stages are separated by ``,``, ``;``, ``then`` or ``, then``; each is ``every N``
        optionally followed by ``until M`` (``every=N``, ``until=M``, a trailing ``steps`` and
        digit separators such as ``10_000`` are accepted too). Case is ignored.

        Args:
          text: The stages.

        Returns:
          The validated policy.

        Raises:
          PolicyError: The text does not read as stages, or the stages are invalid.
        """
        if not isinstance(text, str):
            raise PolicyError(f"Stages.parse takes a string such as {_STAGES_TEXT_EXAMPLE}.")
        if not text.strip():
            raise PolicyError(f"Stages.parse got empty text; write e.g. {_STAGES_TEXT_EXAMPLE}.")
        stages: list[tuple[int, int | None]] = []
        for piece in _STAGE_SEPARATOR_RE.split(text.strip()):
            if not piece:
                raise PolicyError(
                    f"empty stage in {text!r} (a stray separator?); write e.g. "
                    f"{_STAGES_TEXT_EXAMPLE}."
                )
            match = _STAGE_RE.fullmatch(piece)
            if match is None:
                raise PolicyError(
                    f"cannot read stage {piece!r} in {text!r}; each stage is 'every N' or "
                    f"'every N until M', as in {_STAGES_TEXT_EXAMPLE}."
                )
            until = match["until"]
            stages.append((int(match["every"]), None if until is None else int(until)))
        return cls(tuple(stages))

    def __str__(self) -> str:
        return ", then ".join(
            f"every {every}" + ("" if until is None else f" until {until}")
            for every, until in self.stages
        )

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``step`` is a multiple of its stage's ``every``, else SKIP."""
        del ctx
        step = _as_step(step)
        for every, until in self.stages:
            if until is None or step < until:
                return Decision.PERMANENT if step % every == 0 else Decision.SKIP
        return Decision.SKIP

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "stages", "stages": [{"every": ..., "until": ...}, ...]}``."""
        return {
            "type": "stages",
            "stages": [{"every": every, "until": until} for every, until in self.stages],
        }


@dataclasses.dataclass(frozen=True)
class AtSteps:
    """Saves a permanent checkpoint at each of an explicit set of steps.

    Attributes:
      steps: The steps, non-negative ints; any iterable is accepted and stored sorted, without
        duplicates.

    Raises:
      PolicyError: ``steps`` is not a collection of non-negative ints.

    Example:
      >>> AtSteps([5000, 10, 10]).steps
      (10, 5000)
    """

    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        steps = self.steps
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise PolicyError(
                f"AtSteps takes a collection of steps, got {steps!r}; pass e.g. AtSteps([100]) "
                "or AtSteps(range(0, 1000, 250))."
            )
        normal = sorted({_as_step(s, "AtSteps step") for s in steps})
        object.__setattr__(self, "steps", tuple(normal))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``step`` is one of ``steps``, else SKIP."""
        del ctx
        step = _as_step(step)
        i = bisect.bisect_left(self.steps, step)
        hit = i < len(self.steps) and self.steps[i] == step
        return Decision.PERMANENT if hit else Decision.SKIP

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "at_steps", "steps": [...]}``."""
        return {"type": "at_steps", "steps": list(self.steps)}


@dataclasses.dataclass(frozen=True)
class EveryInterval:
    """Saves a *temporary* checkpoint when ``seconds`` have passed since the last save.

    The time comes from the context (the manager's injected clock). A temporary checkpoint is
    deleted by :func:`plan` once any newer checkpoint exists, so this bounds the work lost to
    a crash without filling the disk.

    What the interval counts from, before this manager's first save, is ``since``:

    - ``"newest"`` (the default): the newest step held, whoever saved it
      (``ctx.last_save_time``). After a restart the first temporary comes one interval after
      the newest step on disk was saved: at once if the run was down longer than that.
    - ``"start"``: the start of this manager (``ctx.start_time``), as eformer does: a restart
      after downtime does not write a temporary at once. Steps saved since the start (their
      time is later) count as before.

    Attributes:
      seconds: The interval, a finite number greater than 0.
      since: ``"newest"`` or ``"start"``.

    Raises:
      PolicyError: ``seconds`` is not a finite number greater than 0, or a bad ``since``.

    Example:
      >>> EveryInterval(600).decide(7, SaveContext(now=1000.0, last_save_time=300.0))
      <Decision.TEMPORARY: 1>
      >>> ctx = SaveContext(now=1000.0, last_save_time=300.0, start_time=900.0)
      >>> EveryInterval(600, since="start").decide(7, ctx)
      <Decision.SKIP: 0>
    """

    seconds: float
    since: Literal["newest", "start"] = "newest"

    def __post_init__(self) -> None:
        seconds = self.seconds
        if not _is_real(seconds) or not math.isfinite(seconds) or seconds <= 0:
            raise PolicyError(
                f"EveryInterval(seconds) must be a finite number of seconds greater than 0, got "
                f"{seconds!r}; pass e.g. EveryInterval(600) for every ten minutes."
            )
        object.__setattr__(self, "seconds", float(seconds))
        _choice(self.since, "EveryInterval(since)", ("newest", "start"))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """TEMPORARY when nothing to count from is known or ``seconds`` have passed since it,
        else SKIP."""
        _as_step(step)
        last = ctx.last_save_time
        if self.since == "start" and ctx.start_time is not None:
            last = ctx.start_time if last is None else max(last, ctx.start_time)
        if last is None or ctx.now - last >= self.seconds:
            return Decision.TEMPORARY
        return Decision.SKIP

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "every_interval", "seconds": seconds}`` (and ``"since"`` unless
        it is the default)."""
        config: dict[str, Any] = {"type": "every_interval", "seconds": self.seconds}
        if self.since != "newest":
            config["since"] = self.since
        return config


@dataclasses.dataclass(frozen=True)
class OnEvents:
    """Saves a permanent checkpoint on lifecycle events, every ``every_n``-th occurrence.

    Only event-driven calls (``ctx.event`` set) can match; plain ``save`` calls are skipped.
    With ``every_n=2`` the checkpoint is saved on the 2nd, 4th, ... occurrence of an event
    (each event name is counted separately, by the manager, in ``ctx.event_count``).

    Attributes:
      events: Event names from :data:`LIFECYCLE_EVENTS`; a single name is accepted too.
        Stored sorted, without duplicates.
      every_n: Save on every ``every_n``-th occurrence, at least 1.

    Raises:
      PolicyError: No event, an unknown event name, or ``every_n`` not an int of at least 1.

    Example:
      >>> policy = OnEvents(["epoch_end"], every_n=2)
      >>> [n for n in range(1, 6)
      ...  if policy.decide(0, SaveContext(now=0.0, event="epoch_end", event_count=n))]
      [2, 4]
    """

    events: tuple[str, ...]
    every_n: int = 1

    def __post_init__(self) -> None:
        events = self.events
        if isinstance(events, str):
            events = (events,)
        if not isinstance(events, Iterable):
            raise PolicyError(
                f"OnEvents takes event names, got {events!r}; pass e.g. OnEvents(['epoch_end'])."
            )
        events = tuple(events)
        known = ", ".join(sorted(LIFECYCLE_EVENTS))
        if not events:
            raise PolicyError(f"OnEvents needs at least one event name, from: {known}.")
        unknown = [e for e in events if e not in LIFECYCLE_EVENTS]
        if unknown:
            names = ", ".join(repr(e) for e in unknown)
            raise PolicyError(
                f"OnEvents got unknown event name(s) {names}; the known ones are: {known}."
            )
        object.__setattr__(self, "events", tuple(sorted(set(events))))
        example = "OnEvents(['epoch_end'], every_n=2)"
        every_n = _positive_int(self.every_n, "OnEvents(every_n)", example)
        object.__setattr__(self, "every_n", every_n)

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``ctx.event`` is one of ``events`` on an ``every_n``-th occurrence."""
        _as_step(step)
        if ctx.event is not None and ctx.event in self.events:
            if ctx.event_count % self.every_n == 0:
                return Decision.PERMANENT
        return Decision.SKIP

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "on_events", "events": [...], "every_n": every_n}``."""
        return {"type": "on_events", "events": list(self.events), "every_n": self.every_n}


@dataclasses.dataclass(frozen=True, init=False)
class AnyOf:
    """Combines save policies: the strongest decision of its parts wins.

    ``AnyOf(EveryInterval(600), EveryNSteps(1000))`` saves a permanent checkpoint every 1000
    steps and a temporary one whenever ten minutes passed since the last save.

    Args:
      *policies: The save policies (a single list of them is accepted too).

    Attributes:
      policies: The parts, in order.

    Raises:
      PolicyError: No policy, or a part that is not a save policy.
    """

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        if len(policies) == 1 and isinstance(policies[0], (list, tuple)):
            policies = tuple(policies[0])
        if not policies:
            raise PolicyError(
                "AnyOf needs at least one save policy; to never save by policy, pass policy=None."
            )
        for i, policy in enumerate(policies, start=1):
            _check_save_policy(policy, f"AnyOf part {i}")
        object.__setattr__(self, "policies", tuple(policies))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """The maximum of the parts' decisions."""
        step = _as_step(step)
        best = Decision.SKIP
        for policy in self.policies:
            best = max(best, _checked_decision(policy, policy.decide(step, ctx)))
        return best

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"type": "any_of", "policies": [<each part's config>, ...]}``."""
        parts = []
        for policy in self.policies:
            if not callable(getattr(policy, "to_config", None)):
                raise PolicyError(
                    f"AnyOf part {policy!r} has no to_config(); only policies that can describe "
                    "themselves can be saved as configuration."
                )
            parts.append(policy.to_config())
        return {"type": "any_of", "policies": parts}


def decide(policy: SavePolicy | None, step: int, ctx: SaveContext) -> Decision:
    """Decides whether to save at ``step``: what the manager calls for every step or event.

    Args:
      policy: The save policy, or ``None`` to never save by policy (only on preemption or
        when forced, which the manager handles).
      step: The step, a non-negative int.
      ctx: The facts the policy may look at.

    Returns:
      ``Decision.PERMANENT`` when ``ctx.preempted``, whatever the policy; otherwise the
      policy's decision (``Decision.SKIP`` when ``policy`` is ``None``).

    Raises:
      PolicyError: ``step`` is not a non-negative int, ``ctx`` is not a :class:`SaveContext`,
        or ``policy`` is not a save policy or returned something other than a
        :class:`Decision`.
    """
    step = _as_step(step)
    if not isinstance(ctx, SaveContext):
        raise PolicyError(f"decide needs a SaveContext, got {type(ctx).__name__}.")
    if policy is not None:
        _check_save_policy(policy, "policy")
    if ctx.preempted:
        return Decision.PERMANENT
    if policy is None:
        return Decision.SKIP
    return _checked_decision(policy, policy.decide(step, ctx))


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
        object.__setattr__(self, "step", _as_step(self.step, "StepRecord.step"))
        if not _is_real(self.time):
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
        object.__setattr__(self, "n", _positive_int(self.n, "KeepLast(n)", "KeepLast(3)"))

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
        object.__setattr__(self, "k", _positive_int(self.k, "KeepEvery(k)", "KeepEvery(1000)"))

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
        if not _is_real(seconds) or not math.isfinite(seconds) or seconds <= 0:
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
        object.__setattr__(self, "n", _positive_int(self.n, "KeepBest(n)", example))
        if not isinstance(self.metric, str) or not self.metric:
            raise PolicyError(
                f"KeepBest(metric) must be a non-empty metric name, got {self.metric!r}; pass "
                f"e.g. {example}."
            )
        _choice(self.mode, "KeepBest(mode)", ("min", "max"))
        _choice(self.missing, "KeepBest(missing)", ("drop", "keep"))

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


# ---------------------------------------------------------------------------------------------
# Configuration.

_CONFIG_TYPES: dict[str, type] = {
    "every_n_steps": EveryNSteps,
    "stages": Stages,
    "at_steps": AtSteps,
    "every_interval": EveryInterval,
    "on_events": OnEvents,
    "any_of": AnyOf,
    "keep_last": KeepLast,
    "keep_every": KeepEvery,
    "keep_time_interval": KeepTimeInterval,
    "keep_best": KeepBest,
    "keep_all": KeepAll,
}


def policy_from_config(cfg: Mapping[str, Any]) -> SavePolicy | KeepPolicy:
    """Rebuilds a policy from its :meth:`to_config` dict (after a JSON round trip too).

    Args:
      cfg: A mapping with a ``"type"`` field (one of ``every_n_steps``, ``stages``,
        ``at_steps``, ``every_interval``, ``on_events``, ``any_of``, ``keep_last``,
        ``keep_every``, ``keep_time_interval``, ``keep_best``, ``keep_all``) and that
        policy's fields. ``any_of`` nests the configs of its parts; ``stages`` may also be
        given as text, e.g.
        ``{"type": "stages", "stages": "every 100 until 1000, then every 1000"}``.

    Returns:
      The policy, equal to the one the config came from.

    Raises:
      PolicyError: ``cfg`` is not a mapping, its type is unknown, a field is missing or
        unknown, or the policy's own validation fails.

    Example:
      >>> policy_from_config({"type": "keep_best", "n": 2, "metric": "loss", "mode": "max"})
      KeepBest(n=2, metric='loss', mode='max', missing='drop')
    """
    known = ", ".join(_CONFIG_TYPES)
    if not isinstance(cfg, Mapping):
        raise PolicyError(f"a policy config must be a dict with a 'type' field, got {cfg!r}.")
    kind = cfg.get("type")
    cls = _CONFIG_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        what = "has no 'type' field" if kind is None else f"has unknown type {kind!r}"
        raise PolicyError(f"policy config {dict(cfg)!r} {what}; the known types are: {known}.")
    args = {k: v for k, v in cfg.items() if k != "type"}
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(args) - names, key=str)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    absent = [name for name in required if name not in args]
    if unknown or absent:
        problems = []
        if unknown:
            problems.append(f"unknown field(s) {', '.join(repr(k) for k in unknown)}")
        if absent:
            problems.append(f"missing field(s) {', '.join(repr(k) for k in absent)}")
        expected = ", ".join(f.name for f in fields) or "no fields"
        raise PolicyError(
            f"{kind} config {dict(cfg)!r} has {' and '.join(problems)}; it takes: {expected}."
        )
    if cls is AnyOf:
        parts = args["policies"]
        if isinstance(parts, (str, bytes, Mapping)) or not isinstance(parts, Iterable):
            raise PolicyError(f"any_of config needs a list of policy configs, got {parts!r}.")
        # A part that is not a save policy is refused by AnyOf itself.
        return AnyOf(*(cast(SavePolicy, policy_from_config(part)) for part in parts))
    if cls is Stages and isinstance(args["stages"], str):
        return Stages.parse(args["stages"])
    return cls(**args)
