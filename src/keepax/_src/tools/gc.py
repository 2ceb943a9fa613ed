"""Clean a manager directory: show (dry run) or remove what a manager would clean.

Two kinds of things go:

- *leftovers*: staging and trash directories (``*.keepax-*``) of interrupted saves, copies and
  deletions, and on object stores step directories without a commit marker, once nothing in
  them changed for the grace period (younger ones may belong to a save in progress; storages
  that keep no times, such as ``memory://``, are never judged old);
- *steps* that the keep policies no longer keep (``policies.plan``: the newest committed step
  is always kept, superseded temporaries go);
- *uploads*: on S3, multipart uploads that a killed save left unfinished under the directory
  (invisible but stored and billed), started at least the grace period ago;
- *store* files: files of the chunk store of incremental saves that no readable step refers
  to, unchanged for the grace period.

Steps a manager cannot read (foreign files, damaged steps) are listed and never touched. keepax
does not store a directory's keep policies with it: pass the ones the run uses (``keep=``, or
``config=`` a file written from :meth:`CheckpointManager.to_config`). Without any, every
permanent step is kept and only superseded temporaries and leftovers go.

Removal (``apply=True``) goes through a :class:`~keepax.CheckpointManager` (its directory lock,
its two-phase deletion), so it never races a live manager of the same directory on this host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from keepax import policies
from keepax._src.checkpoint.incremental import STORE_DATA, ChunkStore
from keepax._src.commit import protocol
from keepax._src.format.spec import STORE_DIR
from keepax._src.io import Storage, is_hidden_name, open_root
from keepax._src.io.lock import LOCK_NAME
from keepax._src.manager.manager import CheckpointManager
from keepax._src.tools import _common
from keepax.errors import KeepaxError, PolicyError

__all__ = ["gc", "GcItem", "GcResult", "add_gc_parser", "run_gc"]

DEFAULT_GRACE = 600.0


@dataclasses.dataclass(frozen=True)
class GcItem:
    """One entry of the directory that gc removes or leaves.

    Attributes:
      name: Its name in the directory.
      kind: ``leftover`` (staging/trash/unfinished), ``step``, ``upload`` (an unfinished
        multipart upload), ``store`` (an unreferenced chunk store file) or ``unreadable``.
      step: The step, for steps.
      reason: Why it goes (or stays).
      age: Seconds since anything in it changed, where the storage keeps times.
    """

    name: str
    kind: str
    step: int | None = None
    reason: str = ""
    age: float | None = None


@dataclasses.dataclass(frozen=True)
class GcResult:
    """What :func:`gc` found and did.

    Attributes:
      directory: The manager directory.
      applied: Whether ``remove`` was removed (else a dry run).
      remove: What goes (went, when applied).
      keep: Steps kept, with the reasons of the keep policies.
      left: Entries left alone: leftovers younger than the grace period (or of unknown age)
        and entries that are not readable steps.
    """

    directory: str
    applied: bool
    remove: tuple[GcItem, ...]
    keep: dict[int, str]
    left: tuple[GcItem, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: ``directory``, ``applied``, ``remove``, ``keep`` (step ->
        reason, keys as strings), ``left``."""
        return {"directory": self.directory, "applied": self.applied,
                "remove": [dataclasses.asdict(i) for i in self.remove],
                "keep": {str(k): v for k, v in self.keep.items()},
                "left": [dataclasses.asdict(i) for i in self.left]}


def _leftovers(directory: str, grace: float, now: float,
               options: dict[str, Any] | None) -> tuple[list[GcItem], list[GcItem]]:
    """(old leftovers to remove, young or undated ones to leave)."""
    storage = open_root(directory, options)
    remove: list[GcItem] = []
    left: list[GcItem] = []
    marker = not storage.atomic_rename
    for name in storage.list(""):
        if name.startswith(LOCK_NAME) or name == STORE_DIR:
            continue  # the chunk store: its unreferenced files go with apply (manager start)
        unfinished = marker and not is_hidden_name(name) and protocol.is_unfinished(storage, name)
        if not (is_hidden_name(name) or unfinished):
            continue
        what = "unfinished save (no commit marker)" if unfinished else "staging or trash"
        _aged(name, "leftover", what, storage.modified(name), grace, now, remove, left)
    return remove, left


def _aged(name: str, kind: str, what: str, modified: float | None, grace: float, now: float,
          remove: list[GcItem], left: list[GcItem], *, unknown_goes: bool = False) -> None:
    """Files ``name`` under ``remove`` if unchanged for ``grace`` seconds, else under ``left``
    (of unknown age: ``remove`` if ``unknown_goes``)."""
    if modified is None:
        (remove if unknown_goes else left).append(
            GcItem(name, kind, None, f"{what}; age unknown on this storage"))
        return
    age = max(0.0, now - modified)
    if age < grace:
        left.append(GcItem(name, kind, None,
                           f"{what}, changed {age:.0f} s ago (grace {grace:.0f} s)", age))
    else:
        remove.append(GcItem(name, kind, None, f"{what}, unchanged for {age:.0f} s", age))


def _uploads_and_store(storage: Storage, steps: Iterable[str], grace: float, now: float
                       ) -> tuple[list[GcItem], list[GcItem]]:
    """(unfinished uploads and unreferenced store files to remove, those to leave): what a
    manager start aborts (uploads of unknown age too) and collects."""
    remove: list[GcItem] = []
    left: list[GcItem] = []
    for name, started in storage.uploads(""):
        _aged(name, "upload", "unfinished multipart upload", started, grace, now, remove,
              left, unknown_goes=True)
    if not storage.exists(STORE_DATA):
        return remove, left
    store = ChunkStore(storage)
    for name in steps:
        store.track(name)
    live = store.referenced()
    for base in storage.list(STORE_DATA):
        name = f"{STORE_DATA}/{base}"
        if name not in live:
            _aged(name, "store", "chunk store file no step refers to", storage.modified(name),
                  grace, now, remove, left)
    return remove, left


def _keep_policies(keep: Iterable[Any] | None, config: str | dict[str, Any] | None) -> list[Any]:
    if keep is not None and config is not None:
        raise PolicyError("pass keep= or config=, not both")
    if config is None:
        return list(keep or [])
    if isinstance(config, str):
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise PolicyError(f"cannot read the manager config {config!r}: {e}") from e
    if not isinstance(config, dict):
        raise PolicyError(f"a manager config is a JSON object, got {config!r}")
    return [policies.policy_from_config(c) for c in config.get("keep") or []]


def gc(
    directory: str,
    *,
    keep: Iterable[Any] | None = None,
    config: str | dict[str, Any] | None = None,
    apply: bool = False,
    grace: float = DEFAULT_GRACE,
    storage_options: dict[str, Any] | None = None,
) -> GcResult:
    """Shows, or with ``apply`` removes, what a manager would clean in ``directory``.

    Args:
      directory: The manager directory (path or URL).
      keep: The run's keep policies (e.g. ``[policies.KeepLast(3)]``).
      config: Instead of ``keep``, a manager config (a dict or the path of a JSON file, as
        :meth:`CheckpointManager.to_config` returns) whose keep policies to apply.
      apply: Remove; otherwise only report (a dry run).
      grace: Seconds a leftover must have been unchanged to go.
      storage_options: For URLs, as for :func:`keepax.save`.

    Returns:
      What goes, what stays and why.

    Raises:
      PolicyError: invalid keep policies or config.
      KeepaxError: the directory is locked by a live manager (with ``apply``).
    """
    policies_ = _keep_policies(keep, config)
    if not (isinstance(grace, int | float) and grace >= 0):
        raise PolicyError(f"grace must be a non-negative number of seconds, got {grace!r}")
    now = time.time()
    remove, left = _leftovers(directory, grace, now, storage_options)
    with warnings.catch_warnings():
        # Entries that are not readable steps are reported below, not warned about.
        warnings.simplefilter("ignore")
        with CheckpointManager(directory, keep=policies_, read_only=True,
                               storage_options=storage_options) as manager:
            plan = manager.plan_deletions()
            names = {s: manager.metadata(s).name for s in manager.all_steps()}
    storage = open_root(directory, storage_options)
    seen = {i.name for i in remove + left} | set(names.values())
    for name in storage.list(""):
        if name not in seen and not name.startswith(LOCK_NAME) and name != STORE_DIR:
            left.append(GcItem(name, "unreadable", None,
                               "not a readable step of a manager; never removed"))
    more, young = _uploads_and_store(storage, names.values(), grace, now)
    remove += more + [GcItem(names[s], "step", s, "not kept by the keep policies")
                      for s in plan.delete]
    left += young
    keep_reasons = {s: plan.reasons[s] for s in plan.keep}
    if apply and remove:
        _apply(directory, policies_, grace, [i.step for i in remove if i.kind == "step"],
               storage_options)
    return GcResult(storage.display(""), apply, tuple(remove),
                    keep_reasons, tuple(left))


def _apply(directory: str, keep: Sequence[Any], grace: float, steps: Sequence[int | None],
           storage_options: dict[str, Any] | None) -> None:
    """Removes through a manager: its construction removes leftovers, unfinished uploads and
    unreferenced store files older than ``grace``; steps are deleted only if the keep policies
    still drop them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with CheckpointManager(directory, keep=keep, staging_grace=grace, async_save=False,
                               storage_options=storage_options) as manager:
            still = set(manager.plan_deletions().delete)
            for step in steps:
                if step in still:
                    manager.delete(step)
            manager.wait_until_finished()


# ---------------------------------------------------------------------------------------------
# Command line.


def _keep_best(text: str) -> policies.KeepBest:
    n, _, rest = text.partition(":")
    metric, _, mode = rest.partition(":")
    try:
        return policies.KeepBest(int(n), metric, mode=mode or "min")  # type: ignore[arg-type]
    except (ValueError, PolicyError) as e:
        raise argparse.ArgumentTypeError(
            f"--keep-best wants N:METRIC[:min|max], e.g. 2:loss:min ({e})") from e


def add_gc_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax gc DIR [--apply] [--keep-last N] [--keep-every K] [--keep-best ...]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gc", help="show (or --apply) what a manager would clean in a run directory",
        description="Dry run by default: list leftovers of interrupted saves (staging, "
                    "unfinished multipart uploads, unreferenced chunk store files) older than "
                    "the grace period and steps the keep policies drop; --apply removes them. "
                    "The newest step and unreadable entries are never removed.")
    parser.add_argument("directory", help="manager directory or URL")
    parser.add_argument("--apply", action="store_true", help="remove (default: dry run)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help=f"seconds a leftover must be unchanged (default {DEFAULT_GRACE:.0f})")
    parser.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest steps")
    parser.add_argument("--keep-every", type=int, metavar="K", help="keep steps divisible by K")
    parser.add_argument("--keep-best", type=_keep_best, metavar="N:METRIC[:min|max]",
                        help="keep the N best steps by a metric")
    parser.add_argument("--config", help="a manager config JSON (CheckpointManager.to_config) "
                                         "whose keep policies to apply")
    _common.add_common(parser, quiet=False)
    parser.set_defaults(run=run_gc)
    return parser


def run_gc(args: argparse.Namespace) -> int:
    """Runs ``keepax gc``; returns the exit status (0 done, 2 error)."""

    def body() -> int:
        keep: list[Any] = []
        if args.keep_last:
            keep.append(policies.KeepLast(args.keep_last))
        if args.keep_every:
            keep.append(policies.KeepEvery(args.keep_every))
        if args.keep_best:
            keep.append(args.keep_best)
        if keep and args.config:
            raise KeepaxError("pass --keep-* options or --config, not both")
        result = gc(args.directory, keep=keep if not args.config else None, config=args.config,
                    apply=args.apply, grace=args.grace,
                    storage_options=_common.storage_options(args))
        if args.json:
            _common.print_json(result.to_json())
            return 0
        verb = "removed" if result.applied else "would remove"
        for item in result.remove:
            label = f"step {item.step}" if item.step is not None else item.name
            print(f"{verb:<13} {label}  ({item.reason})")
        for step, reason in result.keep.items():
            print(f"{'keep':<13} step {step}  ({reason})")
        for item in result.left:
            print(f"{'leave':<13} {item.name}  ({item.reason})")
        print(f"{len(result.remove)} {'removed' if result.applied else 'to remove'}"
              + ("" if result.applied or not result.remove else "; run with --apply to remove"))
        return 0

    return _common.run_cli("gc", body)
