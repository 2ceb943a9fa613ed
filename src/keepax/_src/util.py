"""Small helpers every layer may import (no keepax imports here)."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float, decimals: int = 2) -> str:
    """A byte count for people: ``"512 B"``, ``"1.50 MiB"`` (binary units up to TiB).

    Args:
      n: The number of bytes (or bytes per second).
      decimals: Digits after the point for KiB and larger (bytes are whole).
    """
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.{decimals}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
