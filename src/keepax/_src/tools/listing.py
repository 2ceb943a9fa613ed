"""``keepax ls``, ``show`` and ``verify``: text (``ls`` with one column per metric and the best
step marked) and machine-readable output (``--json``).

Every ``*_json`` function returns plain JSON-able dicts (no NaN: non-finite floats become
strings), so ``keepax ls DIR --json | jq`` and plotting scripts can rely on the shape
documented in each docstring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from keepax._src import checkpoint
from keepax._src.manager.manager import CheckpointManager
from keepax._src.tools import _common

__all__ = [
    "add_ls_parser", "add_show_parser", "add_verify_parser", "best_of", "format_ls", "ls_json",
    "parse_best", "show_json", "verify_json",
]


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, complex):
        return [_plain(value.real), _plain(value.imag)]
    return value


def parse_best(text: str | None) -> tuple[str, str] | None:
    """``"loss"`` or ``"loss:min"`` / ``"acc:max"`` as ``(metric, mode)``; None stays None."""
    if not text:
        return None
    metric, _, mode = text.partition(":")
    mode = mode or "min"
    if not metric or mode not in ("min", "max"):
        raise ValueError(f"--best wants METRIC[:min|max], e.g. loss:min, got {text!r}")
    return metric, mode


def best_of(steps: Sequence[Any], best: tuple[str, str] | None) -> int | None:
    """The best step by ``(metric, mode)`` among ``StepInfo`` records, as
    ``CheckpointManager.best_step`` picks it (finite values only; ties: the newer step).

    With ``best`` None: by ``loss`` (min) when some step has a ``loss`` metric, else None.
    """
    if best is None:
        if not any("loss" in s.metrics for s in steps):
            return None
        best = ("loss", "min")
    metric, mode = best
    sign = 1.0 if mode == "min" else -1.0
    ranked = []
    for s in steps:
        value = s.metrics.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
                value):
            ranked.append((sign * value, -s.step))
    return -min(ranked)[1] if ranked else None


def ls_json(directory: str, steps: Sequence[Any], best: tuple[str, str] | None = None
            ) -> dict[str, Any]:
    """``keepax ls --json``.

    Args:
      directory: The manager directory as shown.
      steps: ``StepInfo`` records (``[manager.metadata(s) for s in manager.all_steps()]``).
      best: ``(metric, mode)`` defining the best step (see :func:`best_of`).

    Returns:
      ``{"directory", "latest": int|null, "best": {"step", "metric", "mode"}|null,
      "metrics": [names], "steps": [{"step", "name", "path", "temporary", "time", "created",
      "duration", "nbytes", "metrics": {name: value}, "metadata": {...},
      "placeholders": {...}, "best": bool}]}``, steps ascending.
    """
    best_step = best_of(steps, best)
    chosen = best or (("loss", "min") if best_step is not None else None)
    names = sorted({k for s in steps for k in s.metrics})
    return {
        "directory": directory,
        "latest": steps[-1].step if steps else None,
        "best": None if best_step is None or chosen is None else
        {"step": best_step, "metric": chosen[0], "mode": chosen[1]},
        "metrics": names,
        "steps": [
            {"step": s.step, "name": s.name, "path": s.path, "temporary": s.temporary,
             "time": s.time, "created": s.created, "duration": s.duration,
             "nbytes": s.nbytes, "metrics": _plain(dict(s.metrics)),
             "metadata": _plain(dict(s.metadata)), "placeholders": _plain(dict(s.placeholders)),
             "best": s.step == best_step}
            for s in steps
        ],
    }


def format_ls(directory: str, steps: Sequence[Any], best: tuple[str, str] | None = None) -> str:
    """``keepax ls``'s text: one row per step with one column per metric, the best step
    marked ``*``, then a summary line."""
    if not steps:
        return f"{directory}: no steps"
    best_step = best_of(steps, best)
    names = sorted({k for s in steps for k in s.metrics})
    rows = []
    for s in steps:
        created = datetime.datetime.fromtimestamp(s.created, datetime.UTC)
        metrics = [f"{s.metrics[n]:.6g}" if n in s.metrics else "" for n in names]
        rows.append(["*" if s.step == best_step else "", str(s.step),
                     f"{created:%Y-%m-%d %H:%M:%S}", _common.format_size(s.nbytes), *metrics,
                     "temporary" if s.temporary else "permanent", s.name])
    text = _common.table(rows, ["", "step", "time (UTC)", "size", *names, "kind", "name"])
    temporary = sum(s.temporary for s in steps)
    text += (f"\n\n{len(steps)} step{'s' if len(steps) != 1 else ''}"
             + (f" ({temporary} temporary)" if temporary else "")
             + f", {_common.format_size(sum(s.nbytes for s in steps))}, latest {steps[-1].step}")
    if best_step is not None:
        metric, mode = best or ("loss", "min")
        text += f", best {best_step} (* by {metric}, {mode})"
    return text


def show_json(info: Any) -> dict[str, Any]:
    """``keepax show --json`` of a ``CheckpointInfo``.

    Returns:
      ``{"path", "format_version", "created", "writer", "metadata", "nbytes",
      "files": [{"name", "nbytes"}], "leaves": [{"path", "type", "shape", "dtype", "nbytes",
      "chunks", "value", "sharding"}]}``: ``shape``/``dtype`` null for Python values,
      ``value`` null for arrays (bytes values as hex, complex as ``[re, im]``).
    """
    return {
        "path": info.path, "format_version": info.format_version, "created": info.created,
        "writer": _plain(info.writer), "metadata": _plain(info.metadata),
        "nbytes": info.nbytes,
        "files": [{"name": n, "nbytes": b} for n, b in info.files],
        "leaves": [
            {"path": leaf.path, "type": leaf.type,
             "shape": None if leaf.shape is None else list(leaf.shape), "dtype": leaf.dtype,
             "nbytes": leaf.nbytes, "chunks": leaf.chunks, "value": _plain(leaf.value),
             "sharding": _plain(leaf.sharding)}
            for leaf in info.leaves
        ],
    }


def verify_json(path: str, problems: Sequence[str], info: Any = None) -> dict[str, Any]:
    """``keepax verify --json``: ``{"path", "ok", "problems": [str], "leaves": int|null,
    "nbytes": int|null}`` (``info``, a ``CheckpointInfo``, gives the counts when the
    checkpoint opened)."""
    return {"path": path, "ok": not problems, "problems": list(problems),
            "leaves": None if info is None else len(info.leaves),
            "nbytes": None if info is None else info.nbytes}


def add_ls_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax ls DIR [--best METRIC[:min|max]] [--json]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ls", help="list the steps of a CheckpointManager directory")
    parser.add_argument("directory", help="manager directory or URL")
    parser.add_argument("--best", metavar="METRIC[:min|max]",
                        help="mark the best step by this metric (default: loss, if recorded)")
    _common.add_common(parser, quiet=False)
    parser.set_defaults(run=_run_ls)
    return parser


def _run_ls(args: argparse.Namespace) -> int:
    def body() -> int:
        best = parse_best(args.best)
        with CheckpointManager(args.directory, read_only=True,
                                      storage_options=_common.storage_options(args)) as mngr:
            steps = [mngr.metadata(step) for step in mngr.all_steps()]
        if args.json:
            _common.print_json(ls_json(args.directory, steps, best))
        else:
            print(format_ls(args.directory, steps, best))
        return 0

    return _common.run_cli("ls", body)


def add_show_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax show PATH [--json]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "show", help="show a checkpoint's tree, shapes, dtypes and sizes")
    parser.add_argument("path", help="checkpoint directory or URL")
    _common.add_common(parser, quiet=False)
    parser.set_defaults(run=_run_show)
    return parser


def _run_show(args: argparse.Namespace) -> int:
    def body() -> int:
        options = _common.storage_options(args)
        info = checkpoint.open_checkpoint(args.path, storage_options=options).info
        if args.json:
            _common.print_json(show_json(info))
        else:
            print(format_show(info))
        return 0

    return _common.run_cli("show", body)


def format_show(info: checkpoint.CheckpointInfo) -> str:
    """``keepax show``'s text: the header, one row per leaf, then totals."""
    created = datetime.datetime.fromtimestamp(info.created, datetime.UTC)
    lines = [f"checkpoint  {info.path}", f"format      keepax {info.format_version}",
             f"created     {created:%Y-%m-%d %H:%M:%S} UTC",
             "writer      " + ", ".join(f"{k} {v}" for k, v in info.writer.items())]
    if info.metadata:
        lines.append(f"metadata    {json.dumps(info.metadata, sort_keys=True)}")
    rows = []
    for leaf in info.leaves:
        if leaf.shape is None:
            text = repr(leaf.value)
            shape, dtype, size = (text if len(text) <= 40 else text[:37] + "..."), "", ""
        else:
            comma = "," if len(leaf.shape) == 1 else ""
            shape = "(" + ", ".join(map(str, leaf.shape)) + comma + ")"
            dtype, size = leaf.dtype or "", _common.format_size(leaf.nbytes)
        sharded = ""
        if leaf.sharding and leaf.sharding.get("kind") == "named":
            sharded = f"mesh {leaf.sharding['mesh']} spec {leaf.sharding['spec']}"
        rows.append([leaf.path or "<root>", leaf.type, shape, dtype, size, sharded])
    lines += ["", _common.table(rows, ["leaf", "type", "shape / value", "dtype", "size",
                                       "sharding"])]
    arrays = sum(1 for leaf in info.leaves if leaf.shape is not None)
    files = len(info.files)
    lines.append(
        f"\n{len(info.leaves)} leaves ({arrays} arrays), {_common.format_size(info.nbytes)} of "
        f"array data in {files} data file{'s' if files != 1 else ''} "
        f"({_common.format_size(sum(n for _, n in info.files))})"
    )
    return "\n".join(lines)


def add_verify_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax verify PATH [--json] [-q]``: exit 0 sound, 1 damaged, 2 unreadable."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify", help="recompute every checksum")
    parser.add_argument("path", help="checkpoint directory or URL")
    _common.add_common(parser)
    parser.set_defaults(run=_run_verify)
    return parser


def _run_verify(args: argparse.Namespace) -> int:
    def body() -> int:
        options = _common.storage_options(args)
        opened = checkpoint.open_checkpoint(args.path, storage_options=options)
        with _common.Progress("verify", quiet=args.quiet) as bar:
            problems = opened.verify(progress=bar)
        info = opened.info
        if args.json:
            _common.print_json(verify_json(info.path, problems, info))
        elif problems:
            for problem in problems:
                print(f"BAD  {problem}")
            print(f"{args.path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} "
                  "found")
        else:
            print(f"{info.path}: OK ({len(info.leaves)} leaves, "
                  f"{_common.format_size(info.nbytes)} checked)")
        return 1 if problems else 0

    return _common.run_cli("verify", body)
