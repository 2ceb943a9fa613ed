"""Dtype names as stored in the manifest, and their safetensors codes.

The manifest stores NumPy's canonical dtype name (``float32``, ``bfloat16``, ``int4``,
``float8_e4m3fn``, ...). Data files are safetensors files: a dtype safetensors has a code for
is stored under that code, any other dtype as raw bytes (``U8``) typed by our manifest.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

# Codes every safetensors reader since 0.3 understands. Newer codes (C64, F8_E8M0, ...) are
# deliberately not used so that older readers can open our files.
_SAFETENSORS_CODES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
}


_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """Returns the manifest name of a NumPy (or ml_dtypes) dtype."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = np.dtype(dtype).name
    return name


@functools.lru_cache(maxsize=256)
def _lookup(name: str) -> np.dtype:
    extra = getattr(ml_dtypes, name, None) if name.isidentifier() else None
    try:
        dtype = np.dtype(extra if isinstance(extra, type) else name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}") from e
    if dtype.name != name or not is_storable(dtype):
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


def dtype_from_name(name: str) -> np.dtype:
    """Returns the dtype a manifest name denotes.

    Raises:
      ValueError: if the name is not a dtype this installation knows.
    """
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError(f"invalid dtype name {name!r:.70}")
    return _lookup(name)


def is_storable(dtype: np.dtype) -> bool:
    """Whether arrays of this dtype can be stored (numeric, bool, and ml_dtypes types)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        return True
    if dtype.kind in "fc":
        # float128/complex256 are platform-dependent (x87 extended precision): not portable.
        return dtype.itemsize <= (8 if dtype.kind == "f" else 16)
    # ml_dtypes types (bfloat16, float8_*, int4, ...) are kind 'V' with a registered name.
    return dtype.kind == "V" and getattr(ml_dtypes, dtype.name, None) is not None


def safetensors_code(dtype: np.dtype) -> str | None:
    """Returns the safetensors code for a dtype, or None when it must be stored as raw bytes."""
    return _SAFETENSORS_CODES.get(dtype_name(dtype))
