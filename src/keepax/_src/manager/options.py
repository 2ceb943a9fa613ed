"""The manager's options and inputs, checked (pure: no I/O).

:class:`Options` holds every constructor option of :class:`~keepax.CheckpointManager` once
validated, and converts to and from the JSON-able configuration of ``to_config`` /
``from_config``. The ``check_*`` functions validate what ``save`` is given (steps, metrics,
placeholder values).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeGuard

import jax
import numpy as np

from keepax import policies
from keepax._src.async_engine import engine as async_engine
from keepax._src.checkpoint import check_metadata
from keepax._src.format import codecs
from keepax._src.manager.naming import DEFAULT_TEMPLATE, NameTemplate
from keepax.errors import KeepaxError, PolicyError

__all__ = ["DEFAULT_GRACE", "OPTION_NAMES", "Options", "args_from_config", "check_metrics",
           "check_step", "is_real", "json_value"]

DEFAULT_GRACE = 600.0
"""Default seconds before leftovers of interrupted saves are removed."""

OPTION_NAMES = ("save_policy", "keep", "best", "template", "preemption", "discard_newer",
                "staging_grace", "read_only", "clock", "async_save", "max_in_flight",
                "staging_budget_bytes", "keep_previous_temporary", "incremental",
                "compression")
"""The constructor options a configuration may hold (besides ``directory``)."""

OVERRIDE_ONLY = ("storage_options", "metadata", "host_local", "sync_timeout")
"""Constructor options never part of a configuration, which ``from_config`` still takes."""


def is_real(x: Any) -> TypeGuard[numbers.Real]:
    """Whether ``x`` is a real number (``bool`` excluded)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# What save() is given.


def check_step(step: Any) -> int:
    """``step`` as an int; PolicyError unless it is a non-negative integer."""
    if not isinstance(step, bool):
        try:
            value = operator.index(step)
        except TypeError:
            pass
        else:
            if value >= 0:
                return value
    raise PolicyError(f"a step must be a non-negative int, got {step!r}.")


def check_metrics(metrics: Any, step: int, where: str) -> dict[str, float]:
    """Metrics as ``{name: float}``; each value a finite real number."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise KeepaxError(
            f"metrics must be a dict of name -> number, got {type(metrics).__name__}",
            path=where, step=step,
        )
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise KeepaxError(f"metric names must be str, got {name!r}", path=where, step=step)
        number = _real(value)
        if number is None or not math.isfinite(number):
            raise KeepaxError(
                f"metric {name!r} is {value!r}; metrics must be finite real numbers (convert "
                "with float(...); leave out a metric you do not have rather than passing NaN)",
                path=where, step=step,
            )
        out[name] = number
    return out


def _real(value: Any) -> float | None:
    """A Python, NumPy or 0-d array real number as a float, else None."""
    if is_real(value):
        return float(value)
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        dtype = value.dtype
        if jax.numpy.issubdtype(dtype, jax.numpy.integer) or jax.numpy.issubdtype(
            dtype, jax.numpy.floating
        ):
            return float(value)
    return None


def json_value(value: Any) -> Any:
    """A placeholder value as stored in the manifest (JSON scalars as they are, else text)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, str | int | float | bool) else str(value)


# ---------------------------------------------------------------------------------------------
# Constructor options.


def _check_save_policy(policy: Any) -> policies.SavePolicy | None:
    if policy is not None and not callable(getattr(policy, "decide", None)):
        raise PolicyError(
            f"save_policy {policy!r} is not a save policy: it needs a decide(step, ctx) method, "
            "like policies.EveryNSteps(100); pass None to save on every call."
        )
    return policy


def _check_keep(keep: Any) -> list[policies.KeepPolicy]:
    if callable(getattr(keep, "keep", None)):
        keep = [keep]  # a single policy
    if isinstance(keep, str | bytes | Mapping) or not isinstance(keep, Iterable):
        raise PolicyError(f"keep must be a list of keep policies such as [KeepLast(3)], got "
                          f"{keep!r}.")
    keep = list(keep)
    policies.plan([], keep)  # validates each policy
    return keep


def _check_grace(seconds: Any) -> float:
    if not is_real(seconds) or not math.isfinite(seconds) or seconds < 0:
        raise PolicyError(f"staging_grace must be a finite number of seconds >= 0, got "
                          f"{seconds!r}.")
    return float(seconds)


def _check_sync_timeout(seconds: Any) -> float:
    if not (is_real(seconds) and 0 < float(seconds) < math.inf):
        raise PolicyError(f"sync_timeout must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def _check_async(async_save: Any, max_in_flight: Any, staging_budget_bytes: Any) -> None:
    if not isinstance(async_save, bool):
        raise PolicyError(f"async_save must be True or False, got {async_save!r}.")
    try:
        async_engine.check_limits(max_in_flight, staging_budget_bytes)
    except ValueError as e:
        raise PolicyError(f"{e}.") from None


def _check_best(best: Any, keep: Sequence[Any]) -> tuple[str, str] | None:
    """The ``(metric, mode)`` that defines the best step: ``best``, else the first KeepBest's."""
    if best is None:
        for policy in keep:
            if isinstance(policy, policies.KeepBest):
                return (policy.metric, policy.mode)
        return None
    if isinstance(best, str):
        best = (best, "min")
    if (
        not isinstance(best, tuple | list)
        or len(best) != 2
        or not isinstance(best[0], str)
        or not best[0]
        or best[1] not in ("min", "max")
    ):
        raise PolicyError(
            f"best must be a (metric, mode) pair such as ('loss', 'min') or ('accuracy', 'max'), "
            f"got {best!r}."
        )
    return (best[0], best[1])


@dataclasses.dataclass(frozen=True)
class Options:
    """A manager's validated options: the arguments of :class:`~keepax.CheckpointManager`.

    Attributes:
      save_policy: When to save (a :mod:`keepax.policies` save policy); None saves on every
        call.
      keep: Keep policies, e.g. ``[KeepLast(3), KeepEvery(10_000), KeepBest(2, "loss")]``;
        empty keeps every permanent step.
      best: ``(metric, mode)`` defining ``best_step()``, e.g. ``("loss", "min")``; by
        default the first :class:`~keepax.policies.KeepBest`'s.
      best_given: Whether ``best`` was given (only then is it part of the configuration).
      names: Step directory names, from the ``template`` argument: e.g. ``"{step:08d}"``
        (default) or ``"step_{step}_epoch_{epoch}"``; placeholders other than ``step`` are
        passed to ``save``/``event`` as keyword arguments.
      preemption: Install SIGTERM/SIGINT handlers (main thread only; restored by ``close``):
        after a signal the next ``save`` writes whatever the policy says and
        ``reached_preemption`` becomes true.
      discard_newer: Default of ``restore``'s ``discard_newer``.
      read_only: Open without the directory lock, to list and restore only.
      staging_grace: Seconds after which leftovers of interrupted saves (``*.keepax-*``) are
        removed when the manager starts; younger ones may belong to a save in progress.
      clock: Returns the time in seconds (default ``time.time``); policies see this clock.
      async_save: Save in the background (default); False makes ``save`` write and commit
        before returning, raising any failure itself.
      max_in_flight: At most this many saves staged or being written at once.
      staging_budget_bytes: At most this many bytes of staged state not yet written (None:
        no limit beyond ``max_in_flight`` copies of the state). A smaller budget bounds host
        memory at the price of blocking ``save`` while the excess is written.
      storage_options: For a directory URL such as ``s3://bucket/run``: fsspec/s3fs options
        and keepax's ``keepax_*`` transfer options (README, *Object storage*).
      host_local: In a multi-process run, every process saves into its own ``directory``
        (a local disk per host, no shared file system): each writes the shards it holds and
        commits its own copy. Steps count as held only once every process committed them;
        with ``discard_newer`` a process deletes its newer steps that others lack.
      sync_timeout: Seconds a process waits for the others (multi-process runs).
      metadata: Run-level metadata (a JSON-able dict) stored in the directory
        (``keepax-run.json``) and returned by ``run_metadata()``; None keeps what is stored.
        Different metadata replaces the stored one, with a warning.
      keep_previous_temporary: Keep the temporary checkpoints a previous run left (they are
        then kept like permanent steps, as the keep policies say) instead of deleting them
        once this run saves a newer step.
      incremental: Write only chunks whose bytes no committed step of this directory
        already stores (README, *Incremental saves and compression*); off by default (a
        state that changes entirely pays the hashing). Single-process for now: a
        multi-process manager refuses it at construction; ``host_local`` saves are written
        in full.
      compression: Compress every chunk its saves write: ``"zstd"`` or ``("zstd", level)``
        (as :func:`keepax.save`); None stores chunks as they are.
    """

    save_policy: policies.SavePolicy | None
    keep: list[policies.KeepPolicy]
    best: tuple[str, str] | None
    best_given: bool
    names: NameTemplate
    preemption: bool
    discard_newer: bool
    read_only: bool
    staging_grace: float
    clock: Callable[[], float]
    async_save: bool
    max_in_flight: int
    staging_budget_bytes: int | None
    storage_options: dict[str, Any] | None
    host_local: bool
    sync_timeout: float
    metadata: dict[str, Any] | None
    keep_previous_temporary: bool
    incremental: bool = False
    compression: str | tuple[str, int] | None = None

    @classmethod
    def build(
        cls,
        *,
        save_policy: Any = None,
        keep: Any = (),
        best: Any = None,
        template: str = DEFAULT_TEMPLATE,
        preemption: bool = False,
        discard_newer: bool = False,
        read_only: bool = False,
        staging_grace: Any = DEFAULT_GRACE,
        clock: Callable[[], float] | None = None,
        async_save: Any = True,
        max_in_flight: Any = 1,
        staging_budget_bytes: Any = None,
        storage_options: dict[str, Any] | None = None,
        host_local: bool = False,
        sync_timeout: Any = 600.0,
        metadata: Any = None,
        keep_previous_temporary: bool = False,
        incremental: Any = False,
        compression: Any = None,
    ) -> Options:
        """Checks every option (nothing is created on storage).

        Raises:
          PolicyError: An invalid policy, template or option.
        """
        timeout = _check_sync_timeout(sync_timeout)
        _check_async(async_save, max_in_flight, staging_budget_bytes)
        names = NameTemplate(template)
        policy = _check_save_policy(save_policy)
        keep_policies = _check_keep(keep)
        best_pair = _check_best(best, keep_policies)
        grace = _check_grace(staging_grace)
        if read_only and preemption:
            raise PolicyError("preemption=True needs a manager that saves; drop read_only=True.")
        if read_only and metadata is not None:
            raise PolicyError("metadata= needs a manager that writes it; drop read_only=True "
                              "(run_metadata() reads what is stored).")
        if not isinstance(incremental, bool):
            raise PolicyError(f"incremental must be True or False, got {incremental!r}.")
        if isinstance(compression, list):  # as a config holds it
            compression = tuple(compression)
        try:
            codecs.parse_compression(compression)
        except KeepaxError as e:
            raise PolicyError(str(e)) from e
        if metadata is not None and not isinstance(metadata, dict):
            raise PolicyError(f"metadata must be a JSON-able dict, got {metadata!r}.")
        return cls(
            save_policy=policy, keep=keep_policies, best=best_pair, best_given=best is not None,
            names=names, preemption=bool(preemption), discard_newer=bool(discard_newer),
            read_only=bool(read_only), staging_grace=grace,
            clock=clock if clock is not None else time.time, async_save=async_save,
            max_in_flight=max_in_flight, staging_budget_bytes=staging_budget_bytes,
            storage_options=dict(storage_options) if storage_options else None,
            host_local=bool(host_local), sync_timeout=timeout,
            metadata=None if metadata is None else check_metadata(metadata, "run metadata"),
            keep_previous_temporary=bool(keep_previous_temporary), incremental=incremental,
            compression=compression,
        )

    def now(self) -> float:
        """The manager's clock (the one policies see), checked."""
        now = self.clock()
        if not is_real(now):
            raise PolicyError(f"the manager's clock returned {now!r}; it must return seconds.")
        return float(now)

    def to_config(self, directory: str) -> dict[str, Any]:
        """The JSON-able configuration (storage options, clock, ``read_only`` and process
        options are never part of it).

        Raises:
          PolicyError: A policy cannot describe itself (a custom one without ``to_config``).
        """
        def config(policy: Any) -> dict[str, Any]:
            if not callable(getattr(policy, "to_config", None)):
                raise PolicyError(f"policy {policy!r} has no to_config(); it cannot be saved "
                                  "as configuration.")
            return dict(policy.to_config())

        return {
            "directory": directory,
            "template": self.names.template,
            "save_policy": None if self.save_policy is None else config(self.save_policy),
            "keep": [config(p) for p in self.keep],
            "best": list(self.best) if self.best_given and self.best else None,
            "preemption": self.preemption,
            "discard_newer": self.discard_newer,
            "staging_grace": self.staging_grace,
            "async_save": self.async_save,
            "max_in_flight": self.max_in_flight,
            "staging_budget_bytes": self.staging_budget_bytes,
            "keep_previous_temporary": self.keep_previous_temporary,
            "incremental": self.incremental,
            "compression": (list(self.compression) if isinstance(self.compression, tuple)
                            else self.compression),
        }


def args_from_config(config: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments (``directory`` included) a configuration describes.

    Raises:
      PolicyError: An unknown or invalid field.
    """
    if not isinstance(config, Mapping):
        raise PolicyError(f"a manager config must be a dict, got {config!r}.")
    known = {"directory", *OPTION_NAMES}
    # storage_options (credentials, endpoints), run metadata (kept in the directory) and the
    # process options are never in a config: pass them as overrides.
    unknown = sorted(set(config) - known) + sorted(set(overrides) - known - set(OVERRIDE_ONLY))
    if unknown:
        raise PolicyError(f"unknown manager config field(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}.")
    args = dict(config)
    if args.get("save_policy") is not None:
        args["save_policy"] = policies.policy_from_config(args["save_policy"])
    keep = args.get("keep") or []
    if isinstance(keep, Mapping) or not isinstance(keep, list | tuple):
        raise PolicyError(f"config field 'keep' must be a list of policy configs, got {keep!r}.")
    args["keep"] = [policies.policy_from_config(c) for c in keep]
    if args.get("best") is not None:
        args["best"] = tuple(args["best"])
    args.update(overrides)
    if "directory" not in args:
        raise PolicyError("a manager config needs a 'directory'.")
    return args
