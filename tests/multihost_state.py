"""The state the multi-process tests save: global values as NumPy, the same everywhere."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def global_state() -> dict:
    """The global values, as NumPy, the same on every process."""
    return {
        "w": np.arange(16 * 8, dtype=np.float32).reshape(16, 8),
        "rows": (np.arange(24 * 3, dtype=np.int32) * 7).reshape(24, 3),
        "model": np.linspace(-1, 1, 10 * 4, dtype=np.float32).reshape(10, 4).astype(
            ml_dtypes.bfloat16),
        "bias": np.arange(5, dtype=np.float16),
        "small": np.arange(12, dtype=np.int16),
        "host": np.arange(6, dtype=np.uint8),
        "step": 7,
        "lr": 0.25,
        "name": "run",
    }
