"""The ``keepax`` command line: look inside checkpoints and check them.

Commands:
  ``keepax ls DIR``       the steps of a CheckpointManager directory: step, time, size, metrics,
                          temporary or permanent.
  ``keepax show PATH``    the tree: every leaf's type, shape, dtype and size, plus totals.
  ``keepax verify PATH``  re-read every chunk and check its checksum; exit 1 naming bad chunks.

Paths may be object store URLs (``s3://bucket/run/step``, ``gs://...``). Credentials and
endpoints come from the usual places (for S3: ``AWS_*`` environment variables such as
``AWS_ENDPOINT_URL``, ``~/.aws``), or from ``-o/--storage-option KEY=VALUE`` (repeatable; a
dotted key nests, e.g. ``client_kwargs.endpoint_url=http://127.0.0.1:9000``; a value that
parses as JSON is taken as such, e.g. ``keepax_max_attempts=8`` or ``anon=true``).

Exit status: 0 on success, 1 when ``verify`` finds damage, 2 when the checkpoint cannot be
opened (missing, incomplete, unreadable). The CLI uses the public API only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any

import keepax
from keepax.errors import KeepaxError

__all__ = ["main"]


def _size(n: int) -> str:
    """A byte count for people, one decimal (``keepax._src.util.format_bytes`` is the
    library's own; the CLI uses only the public API)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _storage_options(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs as nested storage options (dotted keys nest; JSON values)."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise KeepaxError(f"--storage-option wants KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise KeepaxError(f"--storage-option {pair!r} conflicts with an earlier one")
        target[leaf] = value
    return options


def _open(args: argparse.Namespace) -> keepax.Checkpoint:
    """The checkpoint at ``args.path``, opened once (its manifest read and validated)."""
    return keepax.open(args.path, storage_options=args.storage_options)


def _show(args: argparse.Namespace) -> int:
    info = _open(args).info
    created = datetime.datetime.fromtimestamp(info.created, datetime.UTC)
    print(f"checkpoint  {info.path}")
    print(f"format      keepax {info.format_version}")
    print(f"created     {created:%Y-%m-%d %H:%M:%S} UTC")
    writer = ", ".join(f"{k} {v}" for k, v in info.writer.items())
    print(f"writer      {writer}")
    if info.metadata:
        print(f"metadata    {json.dumps(info.metadata, sort_keys=True)}")
    rows = []
    for leaf in info.leaves:
        if leaf.shape is None:
            text = repr(leaf.value)
            shape, dtype, size = (text if len(text) <= 40 else text[:37] + "..."), "", ""
        else:
            comma = "," if len(leaf.shape) == 1 else ""
            shape = "(" + ", ".join(map(str, leaf.shape)) + comma + ")"
            dtype, size = leaf.dtype or "", _size(leaf.nbytes)
        sharded = ""
        if leaf.sharding and leaf.sharding.get("kind") == "named":
            sharded = f"mesh {leaf.sharding['mesh']} spec {leaf.sharding['spec']}"
        rows.append([leaf.path or "<root>", leaf.type, shape, dtype, size, sharded])
    print()
    print(_table(rows, ["leaf", "type", "shape / value", "dtype", "size", "sharding"]))
    arrays = sum(1 for leaf in info.leaves if leaf.shape is not None)
    print(
        f"\n{len(info.leaves)} leaves ({arrays} arrays), {_size(info.nbytes)} of array data in "
        f"{len(info.files)} data file{'s' if len(info.files) != 1 else ''} "
        f"({_size(sum(n for _, n in info.files))})"
    )
    return 0


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def _ls(args: argparse.Namespace) -> int:
    with keepax.CheckpointManager(args.directory, read_only=True,
                                  storage_options=args.storage_options) as manager:
        infos = [manager.metadata(step) for step in manager.all_steps()]
    if not infos:
        print(f"{args.directory}: no steps")
        return 0
    rows = []
    for info in infos:
        created = datetime.datetime.fromtimestamp(info.created, datetime.UTC)
        rows.append([
            str(info.step),
            f"{created:%Y-%m-%d %H:%M:%S}",
            _size(info.nbytes),
            _metrics_text(dict(info.metrics)),
            "temporary" if info.temporary else "permanent",
            info.name,
        ])
    print(_table(rows, ["step", "time (UTC)", "size", "metrics", "kind", "name"]))
    temporary = sum(info.temporary for info in infos)
    print(
        f"\n{len(infos)} step{'s' if len(infos) != 1 else ''}"
        + (f" ({temporary} temporary)" if temporary else "")
        + f", {_size(sum(info.nbytes for info in infos))}, latest {infos[-1].step}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    checkpoint = _open(args)
    bar = None
    if sys.stderr.isatty() and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
                   file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        problems = checkpoint.verify(progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if problems:
        for problem in problems:
            print(f"BAD  {problem}")
        print(f"{args.path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    info = checkpoint.info
    print(f"{info.path}: OK ({len(info.leaves)} leaves, {_size(info.nbytes)} checked)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    parser = argparse.ArgumentParser(prog="keepax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-o", "--storage-option", action="append", dest="storage_option", metavar="KEY=VALUE",
        help="an fsspec/s3fs or keepax_* storage option for URLs (repeatable; dotted keys nest)",
    )
    ls = commands.add_parser("ls", help="list the steps of a CheckpointManager directory",
                             parents=[common])
    ls.add_argument("directory", help="manager directory or URL")
    ls.set_defaults(run=_ls)
    show = commands.add_parser("show", help="show a checkpoint's tree, shapes, dtypes and sizes",
                               parents=[common])
    show.add_argument("path", help="checkpoint directory or URL")
    show.set_defaults(run=_show)
    verify = commands.add_parser("verify", help="recompute every checksum", parents=[common])
    verify.add_argument("path", help="checkpoint directory or URL")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    try:
        args.storage_options = _storage_options(args.storage_option)
        return args.run(args)
    except (KeepaxError, OSError, ValueError, ImportError) as e:
        print(f"keepax {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
