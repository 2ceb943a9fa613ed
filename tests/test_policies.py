"""Save and keep policies: pure functions of plain facts, tested with no I/O and a fake clock."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import importlib
import inspect
import itertools
import json
import pkgutil
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepax import policies as P
from keepax.errors import KeepaxError, PolicyError
from keepax.policies import (
    LIFECYCLE_EVENTS,
    AnyOf,
    AtSteps,
    Decision,
    EveryInterval,
    EveryNSteps,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepTimeInterval,
    OnEvents,
    RetentionPlan,
    SaveContext,
    Stages,
    StepRecord,
    decide,
    plan,
    policy_from_config,
)

CTX = SaveContext(now=0.0)


def saves(policy: P.SavePolicy, steps, ctx: SaveContext = CTX) -> list[int]:
    return [s for s in steps if decide(policy, s, ctx)]


def rec(step: int, *, temporary: bool = False, **metrics: float) -> StepRecord:
    return StepRecord(step, time=float(step), temporary=temporary, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# The module itself.


def test_module_is_pure_stdlib() -> None:
    """No jax, numpy, I/O, clock or thread imports: only the stdlib pieces it needs."""
    import keepax._src.policies as package  # noqa: PLC0415

    modules = [P, *(importlib.import_module(f"keepax._src.policies.{m.name}")
                    for m in pkgutil.iter_modules(package.__path__))]
    imported = set()
    for module in modules:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    ours = {m for m in imported if m.startswith("keepax._src.policies")}
    assert imported - ours <= {
        "__future__", "bisect", "dataclasses", "enum", "math", "numbers", "operator", "re",
        "types", "collections.abc", "typing", "keepax.errors",
    }


def test_all_names_exist() -> None:
    for name in P.__all__:
        assert hasattr(P, name), name


def test_docstring_examples_run() -> None:
    result = doctest.testmod(P, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


def test_policy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        EveryNSteps(0)
    with pytest.raises(KeepaxError):
        EveryNSteps(0)


# ---------------------------------------------------------------------------------------------
# Decision and SaveContext.


def test_decision_order_and_truthiness() -> None:
    assert Decision.SKIP < Decision.TEMPORARY < Decision.PERMANENT
    assert max(Decision.TEMPORARY, Decision.PERMANENT, Decision.SKIP) is Decision.PERMANENT
    assert not Decision.SKIP and Decision.TEMPORARY and Decision.PERMANENT
    assert str(Decision.TEMPORARY) == "TEMPORARY"


def test_save_context_defaults_and_normalisation() -> None:
    ctx = SaveContext(now=5)
    assert (ctx.last_step, ctx.last_save_time, ctx.event, ctx.event_count, ctx.preempted) == (
        None, None, None, 0, False)
    assert SaveContext(now=0.0, last_step=np.int64(3)).last_step == 3
    assert type(SaveContext(now=0.0, last_step=np.int64(3)).last_step) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.now = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"now": "noon"}, "now must be a number"),
        ({"now": None}, "now must be a number"),
        ({"now": 0.0, "last_save_time": "x"}, "last_save_time must be a number"),
        ({"now": 0.0, "last_step": -1}, "last_step must be non-negative"),
        ({"now": 0.0, "last_step": 1.5}, "last_step must be an int"),
        ({"now": 0.0, "event": "epoch_end", "event_count": 0}, "at least 1"),
        ({"now": 0.0, "event": 3, "event_count": 1}, "event must be an event name"),
        ({"now": 0.0, "event_count": -1}, "non-negative"),
        ({"now": 0.0, "event_count": 1.0}, "event_count must be an int"),
    ],
)
def test_save_context_validation(kwargs, match) -> None:
    with pytest.raises(PolicyError, match=match):
        SaveContext(**kwargs)


# ---------------------------------------------------------------------------------------------
# Save policies.


def test_every_n_steps() -> None:
    assert saves(EveryNSteps(100), range(0, 501)) == [0, 100, 200, 300, 400, 500]
    assert saves(EveryNSteps(1), range(4)) == [0, 1, 2, 3]
    assert EveryNSteps(3).decide(6, CTX) is Decision.PERMANENT
    assert EveryNSteps(3).decide(7, CTX) is Decision.SKIP
    assert EveryNSteps(np.int32(5)).n == 5


@pytest.mark.parametrize(
    ("n", "match"), [(0, "at least 1"), (-3, "at least 1"), (2.5, "must be an int"),
                     ("10", "must be an int"), (True, "must be an int"), (None, "must be an int")])
def test_every_n_steps_validation(n, match) -> None:
    with pytest.raises(PolicyError, match=match):
        EveryNSteps(n)


@pytest.mark.parametrize("step", [-1, 1.0, "3", None, True, np.float32(2.0)])
def test_bad_steps_are_policy_errors(step) -> None:
    ctx = SaveContext(now=0.0, event="step", event_count=1)
    for policy in [EveryNSteps(1), Stages([(1, None)]), AtSteps([1]), EveryInterval(1),
                   OnEvents("step"), AnyOf(EveryNSteps(1))]:
        with pytest.raises(PolicyError, match="step must be"):
            policy.decide(step, ctx)
    with pytest.raises(PolicyError, match="step must be"):
        decide(None, step, ctx)
    with pytest.raises(PolicyError, match="step must be"):  # even when preempted
        decide(None, step, dataclasses.replace(ctx, preempted=True))


def test_numpy_integer_steps_are_accepted() -> None:
    assert decide(EveryNSteps(10), np.int64(20), CTX) is Decision.PERMANENT
    assert decide(EveryNSteps(10), np.array(20), CTX) is Decision.PERMANENT


def test_stages() -> None:
    policy = Stages([(100, 1000), (1000, None)])
    assert saves(policy, range(0, 5001)) == (
        list(range(0, 1000, 100)) + list(range(1000, 5001, 1000)))
    assert policy.decide(999, CTX) is Decision.SKIP
    assert policy.decide(1000, CTX) is Decision.PERMANENT
    assert policy.decide(1500, CTX) is Decision.SKIP


def test_stages_step_counted_from_zero_not_from_stage_start() -> None:
    assert saves(Stages([(100, 250), (100, None)]), range(0, 501)) == [0, 100, 200, 300, 400, 500]


def test_stages_without_open_end_stop_saving() -> None:
    policy = Stages([(10, 50), (20, 100)])
    assert saves(policy, range(0, 300)) == [0, 10, 20, 30, 40, 60, 80]
    assert policy.decide(100, CTX) is Decision.SKIP
    assert policy.decide(200, CTX) is Decision.SKIP


def test_stages_accepts_lists_and_dicts() -> None:
    a = Stages([[100, 1000], {"every": 1000, "until": None}])
    b = Stages(((100, 1000), (1000, None)))
    c = Stages([{"every": 100, "until": 1000}, {"every": 1000}])
    assert a == b == c
    assert a.stages == ((100, 1000), (1000, None))
    assert hash(a) == hash(b)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "at least one stage"),
        ([(0, None)], "every must be at least 1"),
        ([(-5, 10), (5, None)], "every must be at least 1"),
        ([(1.5, None)], "every must be an int"),
        ([(100, 1000), (10, 1000)], r"stage 2's until \(1000\) must be greater than .* 1000"),
        ([(100, 1000), (10, 500), (1, None)], "strictly increase"),
        ([(100, 0)], "must be greater than the first step, 0"),
        ([(100, None), (1000, None)], "only the final stage may be open-ended"),
        ([(100, None), (1000, 5000)], "stage 1 .* not the last stage"),
        ([(100,)], r"must be an \(every, until\) pair"),
        ([(100, 1000, 3)], r"must be an \(every, until\) pair"),
        ([100], r"must be an \(every, until\) pair"),
        ([{"until": 5}], "keys 'every'"),
        ([{"every": 5, "untl": 7}], "keys 'every'"),
        ("every 100", r"use Stages.parse"),
        (5, "list of \\(every, until\\) pairs"),
        ([(100, "1000")], "until must be an int"),
    ],
)
def test_stages_validation(stages, match) -> None:
    with pytest.raises(PolicyError, match=match):
        Stages(stages)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("every 100 until 1000, then every 1000", ((100, 1000), (1000, None))),
        ("every 100", ((100, None),)),
        ("every 500 until 5000", ((500, 5000),)),
        ("Every=100 Until=1_000 then every 10_000", ((100, 1000), (10000, None))),
        ("  every 10 steps until 100 steps; every 50 until 1000, every 1000  ",
         ((10, 100), (50, 1000), (1000, None))),
        ("every 1 until 2,then every 2", ((1, 2), (2, None))),
    ],
)
def test_stages_parse(text, expected) -> None:
    assert Stages.parse(text).stages == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty text"),
        ("   ", "empty text"),
        ("every", "cannot read stage 'every'"),
        ("each 100", "cannot read stage 'each 100'"),
        ("every 100 until", "cannot read stage"),
        ("every -100", "cannot read stage"),
        ("every 1.5", "cannot read stage"),
        ("every 100 until 1000 every 1000", "cannot read stage"),
        ("every 100,, every 1000", "empty stage"),
        ("every 100 until 1000,", "empty stage"),
        ("then every 100", "empty stage"),
        ("every 0", "every must be at least 1"),
        ("every 100, then every 1000", "only the final stage may be open-ended"),
        ("every 100 until 1000, then every 10 until 500", "strictly increase"),
        (None, "takes a string"),
    ],
)
def test_stages_parse_errors(text, match) -> None:
    with pytest.raises(PolicyError, match=match):
        Stages.parse(text)


def test_stages_str_round_trips_through_parse() -> None:
    policy = Stages([(100, 1000), (500, 5000), (1000, None)])
    assert str(policy) == "every 100 until 1000, then every 500 until 5000, then every 1000"
    assert Stages.parse(str(policy)) == policy


@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**4)), min_size=1,
                max_size=5), st.booleans())
@settings(max_examples=50, deadline=None)
def test_stages_parse_str_property(pairs, open_end) -> None:
    untils = list(itertools.accumulate(gap for _, gap in pairs))
    stages = [(every, until) for (every, _), until in zip(pairs, untils)]
    if open_end:
        stages[-1] = (stages[-1][0], None)
    policy = Stages(stages)
    assert Stages.parse(str(policy)) == policy


def test_at_steps() -> None:
    policy = AtSteps([300, 0, 7, 300])
    assert policy.steps == (0, 7, 300)
    assert saves(policy, range(1000)) == [0, 7, 300]
    assert AtSteps(range(0, 30, 10)).steps == (0, 10, 20)
    assert AtSteps([]).decide(0, CTX) is Decision.SKIP
    assert AtSteps({np.int64(4)}).steps == (4,)


@pytest.mark.parametrize(
    ("steps", "match"),
    [(100, r"collection of steps.*AtSteps\(\[100\]\)"), ("100", "collection of steps"),
     ([1, -2], "must be non-negative"), ([1.0], "must be an int"), ([None], "must be an int")])
def test_at_steps_validation(steps, match) -> None:
    with pytest.raises(PolicyError, match=match):
        AtSteps(steps)


def test_every_interval_with_simulated_clock() -> None:
    """A loop with a fake clock: a step takes 7 s; temporaries every >= 60 s."""
    policy = EveryInterval(60)
    now, last_save_time, saved = 1000.0, None, []
    for step in range(100):
        ctx = SaveContext(now=now, last_step=saved[-1] if saved else None,
                          last_save_time=last_save_time)
        decision = decide(policy, step, ctx)
        assert decision in (Decision.SKIP, Decision.TEMPORARY)
        if decision:
            saved.append(step)
            last_save_time = now
        now += 7.0
    assert saved == list(range(0, 100, 9))  # 9 steps * 7 s = 63 s >= 60 s; 8 * 7 = 56 s < 60 s


def test_every_interval_boundaries() -> None:
    policy = EveryInterval(10.5)
    assert policy.seconds == 10.5
    assert policy.decide(0, SaveContext(now=0.0)) is Decision.TEMPORARY  # never saved yet
    assert policy.decide(0, SaveContext(now=110.5, last_save_time=100.0)) is Decision.TEMPORARY
    assert policy.decide(0, SaveContext(now=110.4, last_save_time=100.0)) is Decision.SKIP
    # A temporary from a previous run: its recorded time counts as the last save.
    assert policy.decide(0, SaveContext(now=105.0, last_save_time=100.0)) is Decision.SKIP
    # A clock that went backwards does not trigger a save.
    assert policy.decide(0, SaveContext(now=50.0, last_save_time=100.0)) is Decision.SKIP
    assert EveryInterval(3).seconds == 3.0 and isinstance(EveryInterval(3).seconds, float)


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan"), "60", None, True])
def test_every_interval_validation(seconds) -> None:
    with pytest.raises(PolicyError, match="finite number of seconds greater than 0"):
        EveryInterval(seconds)


def test_every_interval_since_the_manager_start() -> None:
    default, eformer = EveryInterval(60), EveryInterval(60, since="start")
    # A restart after downtime: the newest step on disk is old, the manager just started.
    ctx = SaveContext(now=1000.0, last_save_time=100.0, start_time=990.0)
    assert decide(default, 5, ctx) == Decision.TEMPORARY
    assert decide(eformer, 5, ctx) == Decision.SKIP
    assert decide(eformer, 5, dataclasses.replace(ctx, now=1050.0)) == Decision.TEMPORARY
    # Once this manager saved, both count from that save.
    later = SaveContext(now=1100.0, last_save_time=1060.0, start_time=990.0)
    assert decide(default, 6, later) == decide(eformer, 6, later) == Decision.SKIP
    # Nothing saved and no start time: both save at once.
    assert decide(eformer, 0, SaveContext(now=5.0)) == Decision.TEMPORARY
    assert decide(eformer, 0, SaveContext(now=5.0, start_time=0.0)) == Decision.SKIP
    assert EveryInterval(60).to_config() == {"type": "every_interval", "seconds": 60.0}
    assert eformer.to_config() == {"type": "every_interval", "seconds": 60.0, "since": "start"}
    with pytest.raises(PolicyError, match="EveryInterval\\(since\\) must be 'newest' or"):
        EveryInterval(60, since="boot")
    with pytest.raises(PolicyError, match="start_time must be a number"):
        SaveContext(now=0.0, start_time="now")


def test_on_events_every_n_counts_occurrences() -> None:
    policy = OnEvents(["epoch_end"], every_n=2)
    saved = [n for n in range(1, 8)
             if decide(policy, 10 * n, SaveContext(now=0.0, event="epoch_end", event_count=n))]
    assert saved == [2, 4, 6]


def test_on_events_matching() -> None:
    policy = OnEvents(["phase_end", "epoch_end", "phase_end"])
    assert policy.events == ("epoch_end", "phase_end")
    assert OnEvents("batch_end").events == ("batch_end",)
    hit = SaveContext(now=0.0, event="phase_end", event_count=1)
    assert policy.decide(3, hit) is Decision.PERMANENT
    assert policy.decide(3, dataclasses.replace(hit, event="batch_end")) is Decision.SKIP
    # Plain save calls (no event) never match, whatever the count.
    assert policy.decide(3, SaveContext(now=0.0, event_count=2)) is Decision.SKIP
    # A name outside the lifecycle events simply never matches.
    assert policy.decide(3, dataclasses.replace(hit, event="custom")) is Decision.SKIP


def test_lifecycle_events() -> None:
    assert LIFECYCLE_EVENTS == {
        "experiment_start", "experiment_end", "phase_start", "phase_end", "group_start",
        "group_end", "epoch_start", "epoch_end", "batch_start", "batch_end", "step"}
    for event in LIFECYCLE_EVENTS:
        assert OnEvents([event]).decide(
            0, SaveContext(now=0.0, event=event, event_count=1)) is Decision.PERMANENT


@pytest.mark.parametrize(
    ("events", "every_n", "match"),
    [
        (["epoch_ned"], 1, r"unknown event name\(s\) 'epoch_ned'.*batch_end.*step"),
        (["epoch_end", "EPOCH_END"], 1, "'EPOCH_END'"),
        ([], 1, "at least one event name, from: batch_end"),
        (None, 1, "takes event names"),
        ([3], 1, "unknown event"),
        (["epoch_end"], 0, "every_n.* at least 1"),
        (["epoch_end"], 1.5, "every_n.* must be an int"),
    ],
)
def test_on_events_validation(events, every_n, match) -> None:
    with pytest.raises(PolicyError, match=match):
        OnEvents(events, every_n=every_n)


def test_any_of_combines_temporary_and_permanent() -> None:
    policy = AnyOf(EveryInterval(600), EveryNSteps(1000))
    due = SaveContext(now=1000.0, last_save_time=0.0)
    not_due = SaveContext(now=100.0, last_save_time=0.0)
    assert policy.decide(1000, due) is Decision.PERMANENT  # permanent beats temporary
    assert policy.decide(1000, not_due) is Decision.PERMANENT
    assert policy.decide(1234, due) is Decision.TEMPORARY
    assert policy.decide(1234, not_due) is Decision.SKIP


def test_any_of_nesting_and_list_form() -> None:
    inner = AnyOf(AtSteps([5]), OnEvents("epoch_end"))
    policy = AnyOf([EveryNSteps(100), inner])
    assert policy.policies == (EveryNSteps(100), inner)
    assert saves(policy, range(0, 201)) == [0, 5, 100, 200]
    ctx = SaveContext(now=0.0, event="epoch_end", event_count=1)
    assert policy.decide(7, ctx) is Decision.PERMANENT
    assert AnyOf(EveryNSteps(3)) == AnyOf([EveryNSteps(3)])
    assert hash(AnyOf(EveryNSteps(3))) == hash(AnyOf(EveryNSteps(3)))


def test_any_of_validation() -> None:
    with pytest.raises(PolicyError, match="at least one save policy.*policy=None"):
        AnyOf()
    with pytest.raises(PolicyError, match="AnyOf part 2 .* is not a save policy"):
        AnyOf(EveryNSteps(1), KeepLast(3))
    with pytest.raises(PolicyError, match="AnyOf part 1 None"):
        AnyOf(None)


class _Custom:
    """A user-written save policy: anything with decide(step, ctx)."""

    def __init__(self, result):
        self.result = result

    def decide(self, step, ctx):
        return self.result


def test_custom_save_policies() -> None:
    assert decide(_Custom(Decision.TEMPORARY), 3, CTX) is Decision.TEMPORARY
    assert AnyOf(_Custom(Decision.TEMPORARY), EveryNSteps(2)).decide(3, CTX) is Decision.TEMPORARY
    with pytest.raises(PolicyError, match="_Custom.decide returned True; .* return a Decision"):
        decide(_Custom(True), 3, CTX)
    with pytest.raises(PolicyError, match="must return a Decision"):
        AnyOf(_Custom(1)).decide(3, CTX)
    with pytest.raises(PolicyError, match="has no to_config"):
        AnyOf(_Custom(Decision.SKIP)).to_config()
    assert isinstance(EveryNSteps(1), P.SavePolicy)
    assert isinstance(KeepLast(1), P.KeepPolicy)


def test_decide_none_and_preemption_override() -> None:
    preempted = SaveContext(now=0.0, preempted=True)
    assert decide(None, 7, CTX) is Decision.SKIP
    assert decide(None, 7, preempted) is Decision.PERMANENT
    assert decide(EveryNSteps(1000), 7, CTX) is Decision.SKIP
    assert decide(EveryNSteps(1000), 7, preempted) is Decision.PERMANENT
    assert decide(EveryInterval(60), 7, SaveContext(now=1.0, last_save_time=0.0,
                                                    preempted=True)) is Decision.PERMANENT
    assert decide(_Custom(Decision.TEMPORARY), 7, preempted) is Decision.PERMANENT


def test_decide_validation() -> None:
    with pytest.raises(PolicyError, match="needs a SaveContext"):
        decide(EveryNSteps(1), 0, {"now": 0.0})
    with pytest.raises(PolicyError, match="is not a save policy"):
        decide(KeepLast(3), 0, CTX)
    with pytest.raises(PolicyError, match="is not a save policy"):
        decide("every 100", 0, CTX)


# ---------------------------------------------------------------------------------------------
# StepRecord.


def test_step_record() -> None:
    metrics = {"loss": 0.5}
    r = StepRecord(np.int64(10), time=3, metrics=metrics)
    metrics["loss"] = 9.0  # the record holds its own copy
    assert (r.step, r.time, r.temporary, dict(r.metrics)) == (10, 3, False, {"loss": 0.5})
    assert type(r.step) is int
    with pytest.raises(TypeError):
        r.metrics["loss"] = 1.0  # type: ignore[index]
    assert r == StepRecord(10, time=3, metrics={"loss": 0.5})
    assert r != StepRecord(10, time=3, metrics={"loss": 0.6})
    assert hash(r) == hash(StepRecord(10, time=3, metrics={"loss": 0.6}))
    assert StepRecord(1, 0.0).metrics == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1, "time": 0.0}, "StepRecord.step must be non-negative"),
        ({"step": 1.0, "time": 0.0}, "StepRecord.step must be an int"),
        ({"step": 1, "time": "now"}, r"time must be a number .*\(step 1\)"),
        ({"step": 1, "time": 0.0, "temporary": "yes"}, "temporary must be True or False"),
        ({"step": 1, "time": 0.0, "metrics": [("loss", 1.0)]}, "metrics must map"),
        ({"step": 1, "time": 0.0, "metrics": {1: 1.0}}, "metrics must map"),
    ],
)
def test_step_record_validation(kwargs, match) -> None:
    with pytest.raises(PolicyError, match=match):
        StepRecord(**kwargs)


# ---------------------------------------------------------------------------------------------
# Keep policies and plans.


def perm(*steps: int) -> list[StepRecord]:
    return [rec(s) for s in steps]


def test_keep_last() -> None:
    records = perm(0, 100, 200, 300, 400)
    assert KeepLast(2).keep(records) == {300: "last 2", 400: "last 2"}
    assert KeepLast(10).keep(records) == {s: "last 10" for s in (0, 100, 200, 300, 400)}
    p = plan(records, [KeepLast(3)])
    assert p.keep == (200, 300, 400)
    assert p.delete == (0, 100)
    assert p.reasons == {200: "last 3", 300: "last 3", 400: "last 3; newest"}


def test_keep_last_ignores_temporaries() -> None:
    records = [*perm(0, 100, 200), rec(250, temporary=True), rec(260, temporary=True)]
    assert KeepLast(2).keep(records) == {100: "last 2", 200: "last 2"}
    p = plan(records, [KeepLast(2)])
    assert p.keep == (100, 200, 260)
    assert p.delete == (0, 250)
    assert p.reasons[260] == "temporary (newest)"


def test_keep_every() -> None:
    records = perm(*range(0, 3001, 500))
    assert KeepEvery(1000).keep(records) == {0: "every 1000", 1000: "every 1000",
                                             2000: "every 1000", 3000: "every 1000"}
    p = plan([*records, rec(3100)], [KeepEvery(1000)])
    assert p.keep == (0, 1000, 2000, 3000, 3100)
    assert p.delete == (500, 1500, 2500)
    assert p.reasons[3100] == "newest"
    assert KeepEvery(1000).keep([rec(2000, temporary=True)]) == {}


def test_keep_time_interval_one_per_hour() -> None:
    hourly = KeepTimeInterval(3600)
    every_20_min = [StepRecord(s, time=1200.0 * s) for s in range(10)]
    assert hourly.keep(every_20_min) == {0: "one per 3600s", 3: "one per 3600s",
                                         6: "one per 3600s", 9: "one per 3600s"}
    # Irregular saves: each kept step is at least an hour after the previous kept one.
    times = {0: 0.0, 10: 3000.0, 20: 3700.0, 30: 4000.0, 40: 7200.0, 50: 7400.0}
    records = [StepRecord(s, time=t) for s, t in times.items()]
    assert sorted(hourly.keep(records)) == [0, 20, 50]
    # Temporaries are not its business.
    records.append(StepRecord(60, time=20000.0, temporary=True))
    assert sorted(hourly.keep(records)) == [0, 20, 50]
    assert KeepTimeInterval(90).seconds == 90.0


def test_keep_time_interval_composes_and_never_changes_its_mind() -> None:
    clock_records = [StepRecord(s, time=600.0 * s) for s in range(0, 40)]
    keep = [KeepLast(2), KeepTimeInterval(3600), KeepBest(1, "loss")]
    kept: set[int] = set()
    held: list[StepRecord] = []
    for record in clock_records:  # one commit after another, as the manager plans
        held.append(record)
        p = plan(held, keep)
        assert kept - {r.step for r in held} == set()
        hourly = {s for s, why in p.reasons.items() if "one per" in why}
        assert kept <= hourly  # once kept by time, kept forever
        kept = hourly
        held = [r for r in held if r.step in p.keep]
    assert sorted(kept) == list(range(0, 40, 6))
    assert [r.step for r in held] == [*range(0, 37, 6), 38, 39]


@pytest.mark.parametrize("seconds", [0, -5, float("inf"), float("nan"), "3600", None, True])
def test_keep_time_interval_validation(seconds) -> None:
    with pytest.raises(PolicyError, match="KeepTimeInterval\\(seconds\\) must be a finite"):
        KeepTimeInterval(seconds)


def test_keep_best_min_and_max() -> None:
    records = [rec(0, loss=3.0), rec(1, loss=1.0), rec(2, loss=2.0), rec(3, loss=0.5),
               rec(4, loss=4.0)]
    assert KeepBest(2, "loss").keep(records) == {1: "best 2 by loss (min)",
                                                 3: "best 2 by loss (min)"}
    assert KeepBest(2, "loss", mode="max").keep(records) == {0: "best 2 by loss (max)",
                                                             4: "best 2 by loss (max)"}
    p = plan(records, [KeepBest(2, "loss", mode="min")])
    assert p.keep == (1, 3, 4)  # 4 is the worst but the newest: always kept
    assert p.delete == (0, 2)
    assert p.reasons == {1: "best 2 by loss (min)", 3: "best 2 by loss (min)", 4: "newest"}


def test_keep_best_ties_prefer_newer_steps() -> None:
    records = [rec(s, acc=0.9) for s in (10, 20, 30)] + [rec(40, acc=0.1)]
    assert list(KeepBest(2, "acc", mode="max").keep(records)) == [20, 30]
    assert list(KeepBest(1, "acc", mode="min").keep(records)) == [40]


def test_keep_best_missing_metric_rules() -> None:
    records = [rec(0, loss=1.0), rec(1), rec(2, loss=0.5), rec(3, acc=0.9),
               rec(4, loss=float("nan")), StepRecord(5, 5.0, metrics={"loss": "low"}),
               rec(6, loss=2.0)]
    drop = KeepBest(1, "loss")
    assert drop.keep(records) == {2: "best 1 by loss (min)"}
    assert plan(records, [drop]).keep == (2, 6)
    keep = KeepBest(1, "loss", missing="keep")
    assert keep.keep(records) == {
        1: "no loss metric (missing='keep')", 2: "best 1 by loss (min)",
        3: "no loss metric (missing='keep')", 4: "no loss metric (missing='keep')",
        5: "no loss metric (missing='keep')"}
    assert plan(records, [keep]).delete == (0,)


def test_keep_best_accepts_numpy_scalars_and_ignores_temporaries() -> None:
    records = [StepRecord(1, 1.0, metrics={"loss": np.float32(0.5)}),
               StepRecord(2, 2.0, metrics={"loss": np.array(0.25)}),
               StepRecord(3, 3.0, temporary=True, metrics={"loss": 0.0})]
    assert KeepBest(1, "loss").keep(records) == {2: "best 1 by loss (min)"}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, "loss"), {}, "KeepBest\\(n\\) must be at least 1"),
        ((2.0, "loss"), {}, "KeepBest\\(n\\) must be an int"),
        ((1, ""), {}, "non-empty metric name"),
        ((1, None), {}, "non-empty metric name"),
        ((1, "loss"), {"mode": "minimum"}, "mode\\) must be 'min' or 'max', got 'minimum'"),
        ((1, "loss"), {"missing": "skip"}, "missing\\) must be 'drop' or 'keep', got 'skip'"),
    ],
)
def test_keep_best_validation(args, kwargs, match) -> None:
    with pytest.raises(PolicyError, match=match):
        KeepBest(*args, **kwargs)


@pytest.mark.parametrize(("cls", "arg"), [(KeepLast, 0), (KeepLast, -1), (KeepEvery, 0),
                                          (KeepLast, "3"), (KeepEvery, None)])
def test_keep_last_and_every_validation(cls, arg) -> None:
    with pytest.raises(PolicyError, match=rf"{cls.__name__}\(\w\) must be"):
        cls(arg)


def test_keep_all_and_empty_policy_list() -> None:
    records = [*perm(0, 1, 2), rec(3, temporary=True), rec(4)]
    assert KeepAll().keep(records) == {0: "all", 1: "all", 2: "all", 4: "all"}
    p = plan(records, [KeepAll()])
    assert (p.keep, p.delete) == ((0, 1, 2, 4), (3,))
    assert p.reasons[4] == "all; newest"
    # No keep policy configured: keep every permanent step; superseded temporaries still go.
    q = plan(records, [])
    assert (q.keep, q.delete) == ((0, 1, 2, 4), (3,))
    assert q.reasons[0] == "no keep policy"


def test_temporaries_are_superseded() -> None:
    # Only temporaries: each one supersedes the previous.
    temps = [rec(s, temporary=True) for s in (100, 200, 300)]
    p = plan(temps, [KeepLast(5), KeepAll()])
    assert (p.keep, p.delete) == ((300,), (100, 200))
    assert p.reasons == {300: "temporary (newest)"}
    # A newer temporary after the last permanent: both kept, until the next save.
    records = [*perm(0, 1000), rec(1200, temporary=True)]
    assert plan(records, [KeepLast(1)]).keep == (1000, 1200)
    assert plan([*records, rec(1400, temporary=True)], [KeepLast(1)]).delete == (0, 1200)
    assert plan([*records, rec(2000)], [KeepLast(5)]).delete == (1200,)


def test_temporary_left_by_a_previous_run_is_superseded_by_a_new_permanent() -> None:
    # Previous run: permanent at 1000, temporary at 1500, then killed. The new run resumes
    # from 1500 and saves a permanent checkpoint at 2000.
    records = [rec(1000), rec(1500, temporary=True), rec(2000)]
    p = plan(records, [KeepLast(3)])
    assert (p.keep, p.delete) == ((1000, 2000), (1500,))


def test_custom_keep_policy_cannot_keep_superseded_temporaries() -> None:
    class KeepEverything:
        def keep(self, records):
            return {r.step: "mine" for r in records} | {999: "not a checkpoint"}

    records = [rec(1, temporary=True), rec(2), rec(3, temporary=True)]
    p = plan(records, [KeepEverything()])
    assert (p.keep, p.delete) == ((2, 3), (1,))
    assert p.reasons == {2: "mine", 3: "mine; temporary (newest)"}


def test_union_semantics_and_reasons() -> None:
    records = [rec(s, loss=1.0 / (s + 1)) for s in range(0, 5001, 500)]
    records[3] = rec(1500, loss=-1.0)  # the best loss, at an old step
    policies = [KeepLast(2), KeepEvery(2000), KeepBest(1, "loss")]
    p = plan(records, policies)
    assert p.keep == (0, 1500, 2000, 4000, 4500, 5000)
    assert p.delete == (500, 1000, 2500, 3000, 3500)
    assert p.reasons == {
        0: "every 2000", 1500: "best 1 by loss (min)", 2000: "every 2000", 4000: "every 2000",
        4500: "last 2", 5000: "last 2; newest"}
    # The union is the union of each policy's plan.
    keep_sets = [set(plan(records, [q]).keep) for q in policies]
    assert set(p.keep) == set().union(*keep_sets)


def test_newest_is_always_kept_even_when_every_policy_would_drop_it() -> None:
    records = [rec(0, loss=1.0), rec(10, loss=2.0), rec(20, loss=9.0)]
    p = plan(records, [KeepBest(1, "loss"), KeepEvery(1000)])
    assert p.keep == (0, 20)
    assert p.reasons[20] == "newest"
    assert plan([rec(7, temporary=True)], [KeepBest(1, "loss")]).keep == (7,)


def test_plan_is_deterministic_and_order_independent() -> None:
    records = [rec(s, temporary=(s % 7 == 3), loss=float((s * 37) % 11)) for s in range(0, 60, 3)]
    policies = [KeepBest(3, "loss"), KeepLast(2), KeepEvery(9)]
    expected = plan(records, policies)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = records[:]
        rng.shuffle(shuffled)
        p = plan(iter(shuffled), tuple(policies))
        assert p == expected
        assert list(p.reasons) == list(p.keep)
    assert list(expected.keep) == sorted(expected.keep)
    assert list(expected.delete) == sorted(expected.delete)


def test_plan_empty_and_describe() -> None:
    assert plan([], [KeepLast(1)]) == RetentionPlan(keep=(), delete=(), reasons={})
    assert plan([], []).describe() == ""
    p = plan([rec(1), rec(2), rec(3, temporary=True)], [KeepLast(1)])
    assert p.describe() == ("keep   2: last 1\n"
                            "keep   3: temporary (newest)\n"
                            "delete 1")


def test_plan_validation() -> None:
    with pytest.raises(PolicyError, match="two records for step 5"):
        plan([rec(5), rec(5, temporary=True)], [])
    with pytest.raises(PolicyError, match="takes StepRecord objects"):
        plan([5], [])
    with pytest.raises(PolicyError, match=r"wrap the single policy in a list"):
        plan([rec(5)], KeepLast(3))
    with pytest.raises(PolicyError, match="is not a keep policy"):
        plan([rec(5)], [EveryNSteps(3)])

    class Bad:
        def keep(self, records):
            return [r.step for r in records]

    with pytest.raises(PolicyError, match="Bad.keep returned .* must return a\\s+dict"):
        plan([rec(5)], [Bad()])


@st.composite
def record_sets(draw) -> list[StepRecord]:
    steps = draw(st.lists(st.integers(0, 300), unique=True, max_size=25))
    out = []
    for step in steps:
        metrics = {}
        if draw(st.booleans()):
            metrics["loss"] = draw(st.one_of(st.floats(-5, 5), st.just(float("nan"))))
        if draw(st.booleans()):
            metrics["acc"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        out.append(StepRecord(step, time=float(draw(st.integers(0, 10**6))),
                              temporary=draw(st.booleans()), metrics=metrics))
    return out


keep_policies = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepEvery, st.integers(1, 60)),
    st.builds(KeepBest, st.integers(1, 4), st.sampled_from(["loss", "acc", "absent"]),
              st.sampled_from(["min", "max"]), st.sampled_from(["drop", "keep"])),
    st.just(KeepAll()),
    st.builds(KeepTimeInterval, st.integers(1, 10**5)),
)


@given(record_sets(), st.lists(keep_policies, max_size=4), keep_policies)
@settings(max_examples=200, deadline=None)
def test_plan_properties(records, policies, extra) -> None:
    p = plan(records, policies)
    steps = {r.step for r in records}
    # keep and delete partition the steps, sorted, and every kept step has a reason.
    assert set(p.keep) | set(p.delete) == steps
    assert not set(p.keep) & set(p.delete)
    assert list(p.keep) == sorted(p.keep) and list(p.delete) == sorted(p.delete)
    assert set(p.reasons) == set(p.keep) and all(p.reasons.values())
    if records:
        assert max(steps) in p.keep  # the newest is always kept
    # Superseded temporaries are always deleted.
    for r in records:
        if r.temporary and r.step != max(steps):
            assert r.step in p.delete
    # Adding a policy never deletes more (for a configured, non-empty policy list).
    if policies:
        assert set(plan(records, [*policies, extra]).delete) <= set(p.delete)
        assert set(plan(records, [extra, *policies]).delete) <= set(p.delete)
    else:  # An empty list means "keep everything", like KeepAll.
        assert p.keep == plan(records, [KeepAll()]).keep
    # Deterministic: the same inputs, reversed, give the same plan.
    assert plan(list(reversed(records)), policies) == p


# ---------------------------------------------------------------------------------------------
# Configuration round trips.

ALL_POLICIES = [
    EveryNSteps(100),
    Stages([(100, 1000), (1000, None)]),
    Stages([(10, 50), (20, 100)]),
    AtSteps([0, 5, 10_000]),
    AtSteps([]),
    EveryInterval(600),
    EveryInterval(0.25),
    OnEvents(["epoch_end", "phase_end"], every_n=2),
    OnEvents("step"),
    AnyOf(EveryInterval(600), EveryNSteps(1000)),
    AnyOf(AnyOf(AtSteps([1]), OnEvents("batch_end", every_n=3)),
          Stages([(5, None)])),
    KeepLast(3),
    KeepEvery(1000),
    KeepBest(2, "loss"),
    KeepBest(1, "accuracy", mode="max", missing="keep"),
    KeepAll(),
    KeepTimeInterval(3600),
    EveryInterval(600, since="start"),
]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=repr)
def test_config_json_round_trip(policy) -> None:
    cfg = policy.to_config()
    assert isinstance(cfg["type"], str)
    text = json.dumps(cfg, allow_nan=False)
    back = policy_from_config(json.loads(text))
    assert back == policy
    assert type(back) is type(policy)
    assert back.to_config() == cfg


def test_config_shapes() -> None:
    assert Stages([(100, 1000), (1000, None)]).to_config() == {
        "type": "stages",
        "stages": [{"every": 100, "until": 1000}, {"every": 1000, "until": None}]}
    assert AnyOf(EveryNSteps(2)).to_config() == {
        "type": "any_of", "policies": [{"type": "every_n_steps", "n": 2}]}
    assert KeepAll().to_config() == {"type": "keep_all"}
    assert policy_from_config({"type": "stages", "stages": "every 100 until 1000, then every 1000"}
                              ) == Stages([(100, 1000), (1000, None)])
    cfg = {"type": "keep_best", "n": 1, "metric": "loss"}
    assert policy_from_config(cfg) == KeepBest(1, "loss")
    assert policy_from_config({"type": "on_events", "events": ["step"]}) == OnEvents("step")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"type": "every_n_steps_typo", "n": 1}, "unknown type 'every_n_steps_typo'.*keep_all"),
        ({"n": 1}, "has no 'type' field; the known types are: every_n_steps"),
        ({"type": ["stages"]}, "unknown type"),
        ("keep_last", "must be a dict with a 'type' field"),
        (None, "must be a dict"),
        ({"type": "keep_last"}, "missing field\\(s\\) 'n'; it takes: n"),
        ({"type": "keep_last", "n": 1, "m": 2}, "unknown field\\(s\\) 'm'"),
        ({"type": "keep_all", "n": 1}, "unknown field\\(s\\) 'n'; it takes: no fields"),
        ({"type": "keep_best", "n": 1}, "missing field\\(s\\) 'metric'"),
        ({"type": "keep_last", "n": 0}, "KeepLast\\(n\\) must be at least 1"),
        ({"type": "stages", "stages": "every 100, then every 1000"}, "only the final stage"),
        ({"type": "any_of", "policies": {"type": "keep_all"}}, "list of policy configs"),
        ({"type": "any_of", "policies": []}, "at least one save policy"),
        ({"type": "any_of", "policies": [{"type": "keep_last", "n": 2}]}, "not a save policy"),
        ({"type": "any_of", "policies": [{"type": "bogus"}]}, "unknown type 'bogus'"),
        ({"type": "on_events", "events": ["epoch_ned"]}, "unknown event name"),
    ],
)
def test_config_errors(cfg, match) -> None:
    with pytest.raises(PolicyError, match=match):
        policy_from_config(cfg)
