"""The format's names, versions and patterns, in one place (``docs/FORMAT.md``).

Everything a writer puts on storage by name, and every pattern a reader checks untrusted text
against, is defined here once; the rest of keepax imports it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = [
    "KEEPAX_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TABLES_VERSION",
    "CODECS_VERSION",
    "SHUFFLE_VERSION",
    "CODEC_VERSIONS",
    "NEWEST_VERSION",
    "MANIFEST_FILE",
    "COMMIT_FILE",
    "DATA_DIR",
    "CODECS",
    "DATA_FILE_RE",
    "STORE_DIR",
    "STORE_FILE_RE",
    "data_path",
    "is_store_ref",
    "TABLE_FILE_RE",
    "VERSION_RE",
    "DIGEST_RE",
    "MAX_TIME",
    "version_text",
    "parse_version",
    "loads",
    "finite_time",
]

KEEPAX_VERSION = "0.1.0"
"""The keepax release (pyproject.toml reads it from here; manifests record it as ``writer``)."""

FORMAT_NAME = "keepax"
FORMAT_VERSION = (1, 0)
"""(major, minor) written when chunk tables are inline and no 1.2 member is used. Readers
reject a newer major version and accept any minor version."""

TABLES_VERSION = (1, 1)
"""The version of checkpoints with per-process chunk tables (``docs/FORMAT.md`` §14)."""

CODECS_VERSION = (1, 2)
"""The version that defines per-chunk ``codec``, ``stored_nbytes`` and ``digest`` (§5.4)."""

SHUFFLE_VERSION = (1, 3)
"""The version that adds the ``zstd-shuffle`` codec (§5.4.2)."""

NEWEST_VERSION = SHUFFLE_VERSION
"""The newest version this keepax knows every member and value of."""

MANIFEST_FILE = "manifest.json"
COMMIT_FILE = "keepax.commit"
DATA_DIR = "data"

CODEC_VERSIONS = {"raw": FORMAT_VERSION, "zstd": CODECS_VERSION, "zstd-shuffle": SHUFFLE_VERSION}
"""Chunk codecs this keepax reads, each with the format version that defines it: ``raw`` (the
bytes as they are), ``zstd`` (one Zstandard frame of them) and ``zstd-shuffle`` (their bytes
grouped by position in each element into byte planes, each a frame or raw); the last two need
``zstandard``."""
CODECS = tuple(CODEC_VERSIONS)

DATA_FILE_RE = re.compile(r"data/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.safetensors")
STORE_DIR = ".keepax-store"
"""A manager directory's shared chunk store (incremental saves): data files that committed
steps refer to as ``../.keepax-store/data/<name>.safetensors`` (``docs/FORMAT.md`` §15)."""
STORE_FILE_RE = re.compile(
    r"\.\./\.keepax-store/data/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.safetensors"
)
"""The one form of reference outside a checkpoint a manifest may name (format 1.2)."""
TABLE_FILE_RE = re.compile(r"data/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.json")
VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
DIGEST_RE = re.compile(r"([a-z0-9][a-z0-9-]{0,31}):([0-9a-f]{16,128})")
"""A content digest, ``<algorithm>:<lowercase hex>`` (``xxh3-128:`` and 32 hex digits)."""

MAX_TIME = 1e11
"""Times (Unix seconds) beyond this (the year 5138) are damage, not dates."""


def version_text(version: tuple[int, int]) -> str:
    """``(1, 2)`` -> ``"1.2"``."""
    return f"{version[0]}.{version[1]}"


def parse_version(text: Any) -> tuple[int, int] | None:
    """The (major, minor) of an untrusted ``"MAJOR.MINOR"`` string, or None if malformed."""
    m = VERSION_RE.fullmatch(text) if isinstance(text, str) else None
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> Any:
    """Parses untrusted JSON text strictly: UTF-8 only; ``NaN``/``Infinity`` are refused.

    Raises:
      ValueError: not valid JSON (also for numbers with more digits than Python converts).
      UnicodeDecodeError: not UTF-8.
      RecursionError: nested too deeply.
    """
    if not isinstance(data, str):
        # UTF-8 only (as the format says): json.loads would detect UTF-16/32 in bytes and
        # import their codecs, work a checkpoint's bytes should never cause.
        data = bytes(data).decode("utf-8")
    return json.loads(data, parse_constant=_reject_constant)


def finite_time(x: Any) -> float | None:
    """An untrusted JSON number as a Unix time in seconds, or None if it is not one (not a
    number, a bool, or outside ``[0, MAX_TIME]``: ``10**309`` is not a float at all, and
    ``1e309`` parses as infinity)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    if isinstance(x, int) and not 0 <= x <= MAX_TIME:
        return None  # float(10**309) would raise OverflowError
    value = float(x)
    return value if math.isfinite(value) and 0 <= value <= MAX_TIME else None


def is_store_ref(name: str) -> bool:
    """Whether a (validated) data file name refers to the manager's chunk store."""
    return name.startswith("../")


def data_path(directory: str, name: str) -> str:
    """The storage path of a checkpoint's data file ``name`` (validated: ``data/...``, or a
    chunk store reference ``../.keepax-store/data/...`` resolved beside ``directory``)."""
    if not name.startswith("../"):
        return f"{directory}/{name}"
    parent = directory.rstrip("/").rpartition("/")[0]
    return f"{parent}/{name[3:]}" if parent else name[3:]
