"""Helpers shared by the tools: leaf names from key paths, sizes, progress bars, CLI output.

The tools build on the public API (``keepax.open`` and friends); nothing here knows the on-disk
format.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from keepax._src.util import format_bytes
from keepax.errors import KeepaxError

__all__ = ["leaf_parts", "parse_size", "format_size", "table", "Progress", "print_json",
           "add_common", "storage_options", "run_cli", "chunked"]


def leaf_parts(tree: Any) -> dict[str, tuple[Any, ...]]:
    """Maps each leaf's key path string to its path as a tuple of names.

    Args:
      tree: ``CheckpointInfo.tree``: plain dicts, lists and tuples with ``LeafInfo`` objects
        at the leaves (``None`` where the saved tree held ``None``).

    Returns:
      ``{leaf.path: (name, ...)}``: dict keys and attribute names as they are, list and tuple
      positions as ints. The root leaf maps to ``()``.
    """
    out: dict[str, tuple[Any, ...]] = {}

    def walk(node: Any, parts: tuple[Any, ...]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, (*parts, key))
        elif isinstance(node, list | tuple):
            for i, child in enumerate(node):
                walk(child, (*parts, i))
        elif node is not None:
            out[node.path] = parts

    walk(tree, ())
    return out


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str) -> int:
    """A byte count from an int or text such as ``"5GB"`` (10⁹, as Hugging Face counts) or
    ``"512MiB"`` (2²⁰).

    Raises:
      KeepaxError: the text is not a size, or the size is not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        unit = (match.group(2) or "").upper() if match else ""
        if match is None or unit not in _UNITS:
            raise KeepaxError(f"not a size: {size!r}; write e.g. 5GB, 500MB, 2GiB or 1000000")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise KeepaxError(f"a size must be positive, got {size!r}")
    return value


def format_size(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 MiB``."""
    return format_bytes(n, 1)


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal (stderr), nothing on a pipe or with ``quiet``.

    Counts bytes by default, or other things (``unit="leaf"``). Use as a context manager;
    call it with ``(done, total)``, as ``Checkpoint.verify`` calls its ``progress``
    argument. A ``done`` below the last one (the next of several checkpoints) starts over.
    """

    def __init__(self, description: str, *, quiet: bool = False, unit: str = "B") -> None:
        self._bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415 - only on a terminal

            self._bar = tqdm(total=0, unit=unit, desc=description, file=sys.stderr,
                             unit_scale=unit == "B", unit_divisor=1024)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if done < self._bar.n:
            self._bar.reset(total=total)
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def print_json(value: Any) -> None:
    """Prints ``value`` as one JSON document on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True,
               quiet: bool = True) -> None:
    """Adds the options every tool command takes: ``-o/--storage-option`` (repeatable, as the
    CLI's other commands), ``--json`` and ``-q/--quiet``."""
    parser.add_argument(
        "-o", "--storage-option", action="append", dest="storage_option", metavar="KEY=VALUE",
        help="an fsspec/s3fs or keepax_* storage option for URLs (repeatable; dotted keys nest)",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The storage options of parsed arguments: ``args.storage_options`` if the CLI already
    parsed them, else the raw ``KEY=VALUE`` pairs parsed here (dotted keys nest; JSON
    values)."""
    parsed = getattr(args, "storage_options", None)
    if parsed is not None:
        return dict(parsed)
    pairs = getattr(args, "storage_option", None)
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
        *parents, last = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise KeepaxError(f"--storage-option {pair!r} conflicts with an earlier one")
        target[last] = value
    return options


def run_cli(command: str, body: Callable[[], int]) -> int:
    """Runs a command's body; a ``KeepaxError`` (or OS/value error) is printed on stderr and
    gives exit status 2, as the CLI's other commands do."""
    try:
        return body()
    except (KeepaxError, OSError, ValueError, ImportError) as e:
        print(f"keepax {command}: {e}", file=sys.stderr)
        return 2


def chunked(total: int, block: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of consecutive blocks covering ``total`` bytes."""
    for offset in range(0, total, block):
        yield offset, min(block, total - offset)
