"""Directories that hold another library's checkpoints instead of keepax steps.

A :class:`~keepax.CheckpointManager` opened on an Orbax ``CheckpointManager`` directory (or on
one Orbax checkpoint) finds no keepax steps in it; it fails with :func:`orbax_directory_error`,
which names ``keepax import-orbax``, rather than start a fresh run there. The checks here are
cheap (a listing and at most three step directories) and need no Orbax installed.
"""

from __future__ import annotations

import re
from typing import Any

from keepax._src.io import Storage, is_hidden_name, open_root
from keepax.errors import KeepaxError

__all__ = ["ORBAX_FILES", "ORBAX_STEP_RE", "ORBAX_TMP_TAG", "looks_like_orbax_dir",
           "orbax_directory_error"]

ORBAX_FILES = frozenset({"_CHECKPOINT_METADATA", "_METADATA", "commit_success.txt",
                         "manifest.ocdbt"})
"""Files an Orbax checkpoint (or one item of an Orbax step) holds."""

ORBAX_STEP_RE = re.compile(r"^(?:.*_)?(\d+)$")
"""The names of an Orbax manager's step directories (``12``, ``checkpoint_12``)."""

ORBAX_TMP_TAG = ".orbax-checkpoint-tmp"
"""Part of the name of an Orbax save in progress."""


def looks_like_orbax_dir(where: Storage | str, storage_options: dict[str, Any] | None = None
                         ) -> bool:
    """Whether a directory holds Orbax checkpoints: is one, or has Orbax step directories.

    Cheap (a listing and at most three step directories) and needs no Orbax, so a
    ``CheckpointManager`` that finds no keepax steps can call it to explain why.

    Args:
      where: A storage rooted at the directory, or its path or URL.
      storage_options: For a URL, as for :func:`keepax.save`.
    """
    storage = where if isinstance(where, Storage) else open_root(where, storage_options)
    try:
        names = storage.list("")
    except OSError:
        return False
    if ORBAX_FILES & set(names):
        return True
    checked = 0
    for name in names:
        if is_hidden_name(name) or ORBAX_TMP_TAG in name or not ORBAX_STEP_RE.match(name):
            continue
        try:
            if not storage.is_dir(name):
                continue
            entries = storage.list(name)
            if ORBAX_FILES & set(entries) or any(
                    storage.exists(f"{name}/{e}/_METADATA") for e in entries[:8]):
                return True
        except OSError:
            pass
        checked += 1
        if checked >= 3:
            break
    return False


def orbax_directory_error(where: str) -> KeepaxError:
    """The error a manager raises on a directory holding Orbax steps and no keepax steps."""
    return KeepaxError(
        "this directory holds Orbax checkpoints and no keepax steps; import them first with "
        f"`keepax import-orbax {where} NEW_DIR` (or keepax.import_orbax), then open NEW_DIR",
        path=where,
    )
