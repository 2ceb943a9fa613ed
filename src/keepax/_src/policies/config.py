"""Policies to and from JSON-able dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, cast

from keepax._src.policies.keep import (
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepPolicy,
    KeepTimeInterval,
)
from keepax._src.policies.save import (
    AnyOf,
    AtSteps,
    EveryInterval,
    EveryNSteps,
    OnEvents,
    SavePolicy,
    Stages,
)
from keepax.errors import PolicyError

__all__ = ["policy_from_config"]

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

