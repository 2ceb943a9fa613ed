"""Small helpers every layer may import (no keepax imports here)."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["format_bytes", "gc_paused"]

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


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_resume = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector for the block (also usable as a decorator).

    Saving or restoring many small arrays allocates tens of thousands of short-lived,
    acyclic objects (manifest entries, chunk records); each allocation burst triggers
    collections that traverse every tracked object of the process (a training state, JAX's
    caches) and took half of a 10,000-leaf save or restore. Reference counting still frees
    everything at once; only cycles wait for the next collection after the block. Nested and
    concurrent pauses (several threads) are counted: the collector resumes, if it was running
    before the first pause, when the last one ends.
    """
    global _gc_depth, _gc_resume
    with _gc_lock:
        if _gc_depth == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_resume:
                gc.enable()
