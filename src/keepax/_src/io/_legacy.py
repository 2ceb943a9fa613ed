"""TEMPORARY: the marker commit's two format-aware steps, until ``_src/commit/`` owns them.

Storage backends hold no format knowledge. Two steps of the marker commit protocol
(``docs/FORMAT.md`` §3.1, *Marker backends*) need the format's file names, and other layers
still call them as :class:`~keepax._src.io.base.Storage` methods
(``checkpoint/snapshot.py``, ``commit/distributed.py``, ``manager/manager.py``). They are kept
here, written only with generic storage operations, and delegated to by
``Storage.begin_write`` / ``Storage.is_unfinished``. Once the commit layer implements them
(with the names from ``format/manifest.py``), this module and those two methods go.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keepax._src.io.base import Storage

# The format's names (``format/manifest.py``: COMMIT_FILE, MANIFEST_FILE, DATA_DIR).
_MARKER = "keepax.commit"
_UNFINISHED_ENTRIES = frozenset({"manifest.json", "data"})


def is_unfinished(storage: Storage, name: str) -> bool:
    """Whether ``name`` holds only what an interrupted marker save leaves (a manifest or data
    files, no commit marker); always false where saves are staged and renamed."""
    if storage.atomic_rename:
        return False
    entries = storage.list(name)
    return bool(entries) and _MARKER not in entries and set(entries) <= _UNFINISHED_ENTRIES


def begin_write(storage: Storage, name: str, *, replace: bool) -> None:
    """Prepares the final name ``name`` for a marker save: deletes an existing checkpoint's
    marker first, then its other files (with ``replace``), or an interrupted save's leftovers
    (and its unfinished uploads). Nothing to do where saves are staged and renamed.

    Raises:
      FileExistsError: ``name`` holds a committed checkpoint and ``replace`` is false, or
        holds files that are not keepax's.
    """
    if storage.atomic_rename:
        return
    entries = storage.list(name)
    if not entries:
        try:
            storage.abort_uploads(name)  # of an earlier save that died mid-file
        except OSError:
            pass  # optional clean-up: the parts stay invisible
        return
    if _MARKER in entries:
        if not replace:
            raise FileExistsError(errno.EEXIST, "a checkpoint exists", storage.display(name))
        # The marker first: from here on no reader takes the old files for a checkpoint.
        storage.delete(f"{name}/{_MARKER}")
    elif not replace and not is_unfinished(storage, name):
        raise FileExistsError(errno.EEXIST, "something else exists here", storage.display(name))
    storage.delete(name)
