"""Dtype names as stored in the manifest, and their safetensors codes.

The manifest stores NumPy's canonical dtype name (``float32``, ``bfloat16``, ``int4``,
``float8_e4m3fn``, ...). Data files are safetensors files: a dtype safetensors has a code for
is stored under that code, any other dtype as raw bytes (``U8``) typed by our manifest.
"""

from __future__ import annotations

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


# Every dtype name the format defines (docs/FORMAT.md §6), the only names keepax writes or
# reads. Names are looked up in this table, never parsed: ``np.dtype(text)`` on manifest text
# would accept NumPy's own syntax (``"f4,f4"``, ``"<U5"``) and raises SyntaxError on some
# strings (``",3"``, ``"04"``).
_NUMPY_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)
_ML_DTYPES_NAMES = (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e3m4", "float8_e4m3",
    "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn", "int1", "uint1", "int2", "uint2", "int4",
    "uint4",
)


def _table() -> dict[str, np.dtype]:
    table = {name: np.dtype(name) for name in _NUMPY_NAMES}
    for name in _ML_DTYPES_NAMES:
        scalar = getattr(ml_dtypes, name, None)  # older ml_dtypes lack the newest types
        if isinstance(scalar, type):
            table[name] = np.dtype(scalar)
    return table


_BY_NAME: dict[str, np.dtype] = _table()
_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """Returns the manifest name of a NumPy (or ml_dtypes) dtype."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = np.dtype(dtype).name
    return name


def dtype_from_name(name: str) -> np.dtype:
    """Returns the dtype a manifest name denotes.

    Raises:
      ValueError: if the name is not one of the format's dtype names (or this installation's
        ml_dtypes lacks it).
    """
    dtype = _BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown or unsupported dtype {name!r:.70}")
    return dtype


def is_storable(dtype: np.dtype) -> bool:
    """Whether arrays of this dtype can be stored: it is one of the format's dtypes (numeric,
    bool, and the ml_dtypes types; not float128/complex256, which are platform-dependent)."""
    return dtype_name(np.dtype(dtype)) in _BY_NAME


def safetensors_code(dtype: np.dtype) -> str | None:
    """Returns the safetensors code for a dtype, or None when it must be stored as raw bytes."""
    return _SAFETENSORS_CODES.get(dtype_name(dtype))
