"""The step index: which steps a manager's directory holds, and what is known of each.

A step is one keepax checkpoint under the manager's directory. The manager's own facts about
it (step number, temporary or not, metrics, clock time, placeholders) are stored in the
checkpoint's manifest metadata under :data:`MANAGER_KEY`, next to the user's metadata under
:data:`USER_KEY`. So the step number is read from the manifest, never parsed from a name, and
the index survives a restart.

:class:`StepIndex` lists the directory, reads each entry's manifest once (reading no array
data), and keeps two maps: the committed steps, and the steps being saved (which save
decisions must see as held).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keepax import policies
from keepax._src import checkpoint
from keepax._src.commit import protocol
from keepax._src.io import Storage, is_hidden_name
from keepax._src.manager.options import check_step, is_real
from keepax._src.manager.run_metadata import RUN_METADATA_NAME
from keepax.errors import CheckpointNotFoundError, KeepaxError, KeepaxWarning, PolicyError

__all__ = ["MANAGER_KEY", "USER_KEY", "SCHEMA", "StepInfo", "StepIndex", "no_best_error",
           "step_info"]

MANAGER_KEY = "keepax.manager"
"""The manifest metadata key holding the manager's facts about a step."""

USER_KEY = "user"
"""The manifest metadata key holding the user's metadata of a step."""

SCHEMA = 1
"""The version of the facts under :data:`MANAGER_KEY`."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One step held by a :class:`CheckpointManager` (what :meth:`~CheckpointManager.metadata`
    returns). Read from the step's manifest; no array data is read.

    Attributes:
      step: The step number (from the manifest, not the name).
      name: The step's directory name.
      path: The step's checkpoint path or URL (pass it to :func:`keepax.restore` and friends).
      temporary: Whether it is a temporary checkpoint, deleted once a newer one is committed.
      time: When it was saved, on the manager's clock (the one policies see).
      created: When its manifest was written, as Unix time.
      duration: Seconds from the start of the save to its manifest being written.
      nbytes: Bytes of its data files.
      metrics: The metrics saved with it.
      metadata: The user metadata saved with it.
      placeholders: The name template's placeholder values it was saved with.
    """

    step: int
    name: str
    path: str
    temporary: bool
    time: float
    created: float
    duration: float | None
    nbytes: int
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    placeholders: Mapping[str, Any]

    def record(self) -> policies.StepRecord:
        """The facts the keep policies see."""
        return policies.StepRecord(self.step, self.time, self.temporary, dict(self.metrics))


def step_info(name: str, info: checkpoint.CheckpointInfo) -> StepInfo:
    """Reads the manager's facts from a checkpoint's metadata; ValueError if there are none."""
    meta = info.metadata.get(MANAGER_KEY)
    if not isinstance(meta, dict):
        raise ValueError(
            f"a keepax checkpoint without {MANAGER_KEY!r} metadata (not written by a "
            "CheckpointManager)"
        )
    step, when, temporary = meta.get("step"), meta.get("time"), meta.get("temporary")
    if type(step) is not int or step < 0:
        raise ValueError(f"its {MANAGER_KEY!r} metadata has no valid step ({step!r})")
    if not is_real(when) or not isinstance(temporary, bool):
        raise ValueError(f"its {MANAGER_KEY!r} metadata lacks a valid time or temporary flag")
    metrics = meta.get("metrics") or {}
    placeholders = meta.get("placeholders") or {}
    user = info.metadata.get(USER_KEY) or {}
    if not all(isinstance(m, dict) for m in (metrics, placeholders, user)):
        raise ValueError(f"its {MANAGER_KEY!r} metadata is malformed")
    started = meta.get("started")
    return StepInfo(
        step=step,
        name=name,
        path=info.path,
        temporary=temporary,
        time=float(when),
        created=info.created,
        duration=info.created - float(started) if is_real(started) else None,
        nbytes=sum(n for _, n in info.files),
        metrics=types.MappingProxyType({str(k): v for k, v in metrics.items()}),
        metadata=types.MappingProxyType(user),
        placeholders=types.MappingProxyType(placeholders),
    )


def no_best_error() -> PolicyError:
    """The error for asking for the best step when no metric defines it."""
    return PolicyError(
        "no metric defines the best step; build the manager with best=('loss', 'min') "
        "or with a policies.KeepBest keep policy."
    )


class StepIndex:
    """The steps of one directory: committed ones (read from their manifests) and those
    being saved by this manager. Thread-safe: the writer thread records commits.

    Args:
      storage: The manager directory's storage.
      storage_options: Passed on when a step's checkpoint is opened.
    """

    def __init__(self, storage: Storage, storage_options: dict[str, Any] | None) -> None:
        self._storage = storage
        self._storage_options = storage_options
        self._where = storage.display("")
        self._records: dict[int, StepInfo] = {}
        self._pending: dict[int, StepInfo] = {}  # steps staged or being written
        self._skipped: dict[str, str] = {}  # names warned about, with the reason
        self._lock = threading.Lock()

    # -- the maps --------------------------------------------------------------------------

    def held(self) -> dict[int, StepInfo]:
        """The committed steps (a copy)."""
        with self._lock:
            return dict(self._records)

    def view(self) -> dict[int, StepInfo]:
        """The steps held and those being saved: what save decisions see."""
        with self._lock:
            return {**self._records, **self._pending}

    def pending(self, step: int) -> StepInfo | None:
        """The step being saved as ``step``, if any."""
        with self._lock:
            return self._pending.get(step)

    def add_pending(self, info: StepInfo) -> None:
        """Notes a step being saved."""
        with self._lock:
            self._pending[info.step] = info

    def forget_pending(self, step: int) -> None:
        """Forgets a step being saved (its save failed)."""
        with self._lock:
            self._pending.pop(step, None)

    def committed(self, step: int, name: str, path: str) -> None:
        """Records a step once its save is committed (reading its manifest back)."""
        record = self.open(name)
        if record is None:
            raise KeepaxError("the step was saved but cannot be read back", path=path, step=step)
        with self._lock:
            self._records[step] = record
            self._pending.pop(step, None)

    def drop(self, record: StepInfo) -> None:
        """Forgets a step (being deleted), unless it was replaced meanwhile."""
        with self._lock:
            if self._records.get(record.step) is record:
                del self._records[record.step]

    def reset(self, found: dict[int, StepInfo]) -> None:
        """Replaces the committed steps by those found by :meth:`scan`."""
        with self._lock:
            self._records = found

    # -- lookups -----------------------------------------------------------------------------

    def get(self, step: Any) -> StepInfo:
        """The committed ``step``.

        Raises:
          PolicyError: ``step`` is not a non-negative int.
          CheckpointNotFoundError: No such step (the message lists those held).
        """
        step = check_step(step)
        with self._lock:
            record = self._records.get(step)
        if record is None:
            raise CheckpointNotFoundError(
                f"step {step} does not exist; {self.available()}", path=self._where, step=step
            )
        return record

    def best_step(self, metric: str, mode: str) -> int | None:
        """The step with the best finite ``metric`` (ties: the newer step), or None."""
        sign = 1.0 if mode == "min" else -1.0
        ranked = [(sign * r.metrics[metric], -r.step) for r in self.held().values()
                  if is_real(r.metrics.get(metric)) and math.isfinite(r.metrics[metric])]
        return -min(ranked)[1] if ranked else None

    def resolve(self, step: int | str | None, best: tuple[str, str] | None) -> StepInfo:
        """The step named by ``restore``'s ``step``: None (the latest), an int, or ``"best"``.

        Raises:
          CheckpointNotFoundError: No such step.
          KeepaxError: ``step`` is another string.
          PolicyError: ``"best"`` without a metric defining it.
        """
        if step is None:
            latest = max(self.held(), default=None)
            if latest is None:
                raise CheckpointNotFoundError(
                    "no steps saved here yet; save one first, or use restore_or_initialize",
                    path=self._where,
                )
            return self.get(latest)
        if isinstance(step, str):
            if step != "best":
                raise KeepaxError(f"step must be None, an int or 'best', got {step!r}",
                                  path=self._where)
            if best is None:
                raise no_best_error()
            found = self.best_step(*best)
            if found is None:
                raise CheckpointNotFoundError(
                    f"no step has the metric {best[0]!r}, so there is no best step; "
                    f"{self.available()}",
                    path=self._where,
                )
            return self.get(found)
        return self.get(step)

    def available(self) -> str:
        """The steps held, for error messages."""
        steps = sorted(self.held())
        if not steps:
            return "no steps are saved here"
        shown = ", ".join(map(str, steps if len(steps) <= 20 else steps[:8] + steps[-8:]))
        if len(steps) > 20:
            shown = shown.replace(f"{steps[7]}, ", f"{steps[7]}, ..., ", 1)
        return f"the available steps are: {shown}"

    # -- reading the directory ---------------------------------------------------------------

    def open(self, name: str, skipped: list[tuple[str, str]] | None = None
             ) -> StepInfo | None:
        """Reads one entry of the directory as a step; None if it is not (with a warning, or
        with ``(name, reason)`` added to ``skipped`` for the caller to warn about)."""
        path = self._storage.display(name)
        try:
            handle = checkpoint.open_checkpoint(path, storage_options=self._storage_options)
            return step_info(name, handle.info)
        except (KeepaxError, OSError, ValueError) as e:
            reason = str(e)
        if not self._storage.atomic_rename and protocol.is_unfinished(self._storage, name):
            return None  # Object stores: a save in progress or interrupted (no marker yet).
        if not self._storage.exists(name):
            return None  # Deleted or renamed since it was listed (another process's retention).
        if self._skipped.get(name) != reason:
            if skipped is None:
                self._warn_skipped(name, reason)
            else:
                skipped.append((name, reason))
        return None

    def _warn_skipped(self, name: str, reason: str) -> None:
        self._skipped[name] = reason
        warnings.warn(
            f"{self._storage.display(name)}: not a step of this manager, skipped and left alone "
            f"(retention never deletes it): {reason}",
            KeepaxWarning,
            stacklevel=5,
        )

    def scan(self, refuse: Callable[[], None] | None = None) -> dict[int, StepInfo]:
        """Lists the directory and reads the steps not read before; returns them by step
        (the index is unchanged until :meth:`reset`).

        Args:
          refuse: Called (to raise) when the directory holds entries but no step, before
            any entry is warned about (e.g. an Orbax directory: :mod:`.foreign`).
        """
        known = {r.name: r for r in self.held().values()}
        found: dict[int, StepInfo] = {}
        skipped: list[tuple[str, str]] = []
        for name in self._storage.list(""):
            if is_hidden_name(name) or name == RUN_METADATA_NAME:
                continue
            record = known.get(name) or self.open(name, skipped)
            if record is None:
                continue
            other = found.get(record.step)
            if other is not None:
                warnings.warn(
                    f"{record.path}: holds step {record.step}, like {other.path}; skipped and "
                    "left alone (delete one of them)",
                    KeepaxWarning,
                    stacklevel=4,
                )
                continue
            found[record.step] = record
        if refuse is not None and skipped and not found:
            refuse()
        for name, reason in skipped:
            self._warn_skipped(name, reason)
        return found

    def records(self, steps: Iterable[int]) -> list[StepInfo]:
        """The committed steps among ``steps``, in that order."""
        held = self.held()
        return [held[s] for s in steps if s in held]
