"""Validation of policy arguments (shared by the save and keep policies)."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import Any

from keepax.errors import PolicyError

__all__ = ["as_int", "as_step", "positive_int", "is_real", "choice"]

# ---------------------------------------------------------------------------------------------
# Validation helpers.


def as_int(value: Any, what: str, example: str) -> int:
    """``value`` as a Python int (NumPy and 0-d integer arrays accepted), else PolicyError."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise PolicyError(
        f"{what} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {example}."
    )


def as_step(value: Any, what: str = "step") -> int:
    """``value`` as a non-negative int step, else PolicyError."""
    step = as_int(value, what, "100")
    if step < 0:
        raise PolicyError(f"{what} must be non-negative, got {step}; steps count up from 0.")
    return step


def positive_int(value: Any, what: str, example: str) -> int:
    n = as_int(value, what, example)
    if n < 1:
        raise PolicyError(f"{what} must be at least 1, got {n}; pass e.g. {example}.")
    return n


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise PolicyError(f"{what} must be {options}, got {value!r}.")
    return value


