"""When to save: pure save policies over the step, an injected clock and lifecycle events."""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from keepax._src.policies.checks import as_int, as_step, choice, is_real, positive_int
from keepax.errors import PolicyError

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
        if not is_real(self.now):
            raise PolicyError(f"SaveContext.now must be a number of seconds, got {self.now!r}.")
        for name in ("last_save_time", "start_time"):
            value = getattr(self, name)
            if value is not None and not is_real(value):
                raise PolicyError(
                    f"SaveContext.{name} must be a number of seconds or None, got {value!r}."
                )
        if self.last_step is not None:
            object.__setattr__(self, "last_step", as_step(self.last_step, "SaveContext.last_step"))
        count = as_int(self.event_count, "SaveContext.event_count", "1")
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
        object.__setattr__(self, "n", positive_int(self.n, "EveryNSteps(n)", "EveryNSteps(100)"))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``step % n == 0``, else SKIP."""
        del ctx
        return Decision.PERMANENT if as_step(step) % self.n == 0 else Decision.SKIP

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
        every = positive_int(every, f"stage {i}'s every", "100")
        if until is None:
            if i != len(items):
                raise PolicyError(
                    f"stage {i} (every {every}) has no 'until' but is not the last stage; only "
                    "the final stage may be open-ended. Give it an 'until' or move it last."
                )
        else:
            until = as_int(until, f"stage {i}'s until", "1000")
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
        step = as_step(step)
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
        normal = sorted({as_step(s, "AtSteps step") for s in steps})
        object.__setattr__(self, "steps", tuple(normal))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``step`` is one of ``steps``, else SKIP."""
        del ctx
        step = as_step(step)
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
        if not is_real(seconds) or not math.isfinite(seconds) or seconds <= 0:
            raise PolicyError(
                f"EveryInterval(seconds) must be a finite number of seconds greater than 0, got "
                f"{seconds!r}; pass e.g. EveryInterval(600) for every ten minutes."
            )
        object.__setattr__(self, "seconds", float(seconds))
        choice(self.since, "EveryInterval(since)", ("newest", "start"))

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """TEMPORARY when nothing to count from is known or ``seconds`` have passed since it,
        else SKIP."""
        as_step(step)
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
        every_n = positive_int(self.every_n, "OnEvents(every_n)", example)
        object.__setattr__(self, "every_n", every_n)

    def decide(self, step: int, ctx: SaveContext) -> Decision:
        """PERMANENT when ``ctx.event`` is one of ``events`` on an ``every_n``-th occurrence."""
        as_step(step)
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
        step = as_step(step)
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
    step = as_step(step)
    if not isinstance(ctx, SaveContext):
        raise PolicyError(f"decide needs a SaveContext, got {type(ctx).__name__}.")
    if policy is not None:
        _check_save_policy(policy, "policy")
    if ctx.preempted:
        return Decision.PERMANENT
    if policy is None:
        return Decision.SKIP
    return _checked_decision(policy, policy.decide(step, ctx))


