"""When to save and what to keep: pure policies over plain facts.

Nothing here does I/O, reads a clock or starts a thread. The
:class:`~keepax.CheckpointManager` gathers the facts (the step, its injected clock's reading,
the lifecycle event, whether a preemption signal arrived, the records of the checkpoints it
holds), asks a policy, and acts on the answer in one place.

**When to save.** A save policy has ``decide(step, ctx) -> Decision``. Call it through the
module function :func:`decide`, which validates the step and makes a preemption override every
policy:

>>> import dataclasses
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

from keepax._src.policies.config import policy_from_config as policy_from_config
from keepax._src.policies.keep import KeepAll as KeepAll
from keepax._src.policies.keep import KeepBest as KeepBest
from keepax._src.policies.keep import KeepEvery as KeepEvery
from keepax._src.policies.keep import KeepLast as KeepLast
from keepax._src.policies.keep import KeepPolicy as KeepPolicy
from keepax._src.policies.keep import KeepTimeInterval as KeepTimeInterval
from keepax._src.policies.keep import RetentionPlan as RetentionPlan
from keepax._src.policies.keep import StepRecord as StepRecord
from keepax._src.policies.keep import plan as plan
from keepax._src.policies.save import LIFECYCLE_EVENTS as LIFECYCLE_EVENTS
from keepax._src.policies.save import AnyOf as AnyOf
from keepax._src.policies.save import AtSteps as AtSteps
from keepax._src.policies.save import Decision as Decision
from keepax._src.policies.save import EveryInterval as EveryInterval
from keepax._src.policies.save import EveryNSteps as EveryNSteps
from keepax._src.policies.save import OnEvents as OnEvents
from keepax._src.policies.save import SaveContext as SaveContext
from keepax._src.policies.save import SavePolicy as SavePolicy
from keepax._src.policies.save import Stages as Stages
from keepax._src.policies.save import decide as decide

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
