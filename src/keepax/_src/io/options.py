"""keepax's own options for object stores and other fsspec file systems: the ``keepax_*``
storage options (their names and defaults are documented in ``fsspec_store``)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

__all__ = ["TransferOptions", "split_options"]

_MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    """keepax's own storage options (module docstring: the ``keepax_*`` option names)."""

    part_size: int = 16 * _MiB
    read_size: int = 64 * _MiB
    max_concurrency: int = 8
    max_attempts: int = 5
    retry_delay: float = 0.1
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    follow_symlinks: bool = False
    max_retry_delay: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.part_size, int) or self.part_size < 5 * _MiB:
            raise ValueError(
                f"keepax_part_size must be an integer >= 5 MiB (S3's smallest part), got "
                f"{self.part_size!r}"
            )
        if not isinstance(self.read_size, int) or self.read_size < _MiB:
            raise ValueError(f"keepax_read_size must be an integer >= 1 MiB, got "
                             f"{self.read_size!r}")
        for name in ("max_concurrency", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"keepax_{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.retry_delay, (int, float)) and 0 <= self.retry_delay <= 60):
            raise ValueError(f"keepax_retry_delay must be 0..60 seconds, got {self.retry_delay!r}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"keepax_{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.follow_symlinks, bool):
            raise ValueError(
                f"keepax_follow_symlinks must be True or False, got {self.follow_symlinks!r}"
            )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based), with jitter."""
        delay = min(self.max_retry_delay, self.retry_delay * (2**attempt))
        return delay * (0.5 + random.random() / 2)


def split_options(
    storage_options: dict[str, Any] | None,
) -> tuple[dict[str, Any], TransferOptions]:
    """Separates keepax's ``keepax_*`` options from those meant for fsspec.

    Raises:
      ValueError: An unknown ``keepax_*`` option or an invalid value.
    """
    fs_options = dict(storage_options or {})
    ours = {k[len("keepax_") :]: fs_options.pop(k) for k in list(fs_options)
            if k.startswith("keepax_")}
    known = {f.name for f in dataclasses.fields(TransferOptions)} - {"max_retry_delay"}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise ValueError(
            f"unknown storage option(s) {', '.join('keepax_' + k for k in unknown)}; keepax's "
            f"own are {', '.join(sorted('keepax_' + k for k in known))}"
        )
    return fs_options, TransferOptions(**ours)
