"""Run-level metadata: one small JSON file beside the steps, independent of any step.

``CheckpointManager(directory, metadata={...})`` stores the metadata in
``<directory>/keepax-run.json`` as ``{"format": "keepax-run", "version": 1, "metadata": {...}}``;
:meth:`~keepax.CheckpointManager.run_metadata` returns it (as Orbax's ``metadata()``). The file
is written atomically: on a local disk to a hidden temporary name, then renamed over the old
one; in memory and on object stores in one put. The step scan, the name template and the
removal of leftovers all leave it alone.

Given metadata that differs from the stored one replaces it, with a
:class:`~keepax.errors.KeepaxWarning` naming the keys that changed (a resumed run with a
changed configuration is not an error); a manager built without ``metadata=`` keeps the stored
one.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from typing import Any

from keepax._src.io import LocalStorage, Storage
from keepax._src.io.base import STAGING_TAG
from keepax.errors import CorruptCheckpointError, KeepaxWarning

__all__ = ["RUN_METADATA_NAME", "read", "store"]

RUN_METADATA_NAME = "keepax-run.json"
"""The run metadata file's name in a manager's directory (never a step)."""

_FORMAT = "keepax-run"
_VERSION = 1


def read(storage: Storage) -> dict[str, Any] | None:
    """The stored run metadata, or None if there is none.

    Raises:
      CorruptCheckpointError: The file exists but is not a run metadata file.
    """
    try:
        data = storage.read_bytes(RUN_METADATA_NAME)
    except FileNotFoundError:
        return None
    where = storage.display(RUN_METADATA_NAME)
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(
            f"the run metadata file is not JSON ({e}); delete it, or build the manager with "
            "metadata={...} to replace it", path=where,
        ) from None
    if (not isinstance(doc, dict) or doc.get("format") != _FORMAT
            or not isinstance(doc.get("metadata"), dict)):
        raise CorruptCheckpointError(
            "not a keepax run metadata file (expected {'format': 'keepax-run', 'version': 1, "
            "'metadata': {...}}); delete it, or build the manager with metadata={...} to "
            "replace it", path=where,
        )
    return dict(doc["metadata"])


def store(storage: Storage, metadata: dict[str, Any]) -> None:
    """Stores checked (JSON round-tripped) run metadata, replacing what is there: with a
    warning if it differs, not at all if it is the same."""
    try:
        stored = read(storage)
    except CorruptCheckpointError as e:
        warnings.warn(f"{e}; it is replaced", KeepaxWarning, stacklevel=4)
        stored = None
    if stored == metadata:
        return
    if stored is not None:
        changed = sorted(k for k in {*stored, *metadata} if stored.get(k) != metadata.get(k))
        warnings.warn(
            f"{storage.display(RUN_METADATA_NAME)}: the run metadata given differs from the "
            f"stored one (keys {', '.join(map(repr, changed))}); the stored one is replaced. "
            "Build the manager without metadata= to keep it.",
            KeepaxWarning, stacklevel=4,
        )
    doc = {"format": _FORMAT, "version": _VERSION, "metadata": metadata}
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    if not isinstance(storage, LocalStorage):
        storage.write_bytes(RUN_METADATA_NAME, data)  # one put (memory, object stores)
        return
    temporary = f"{RUN_METADATA_NAME}{STAGING_TAG}tmp-{uuid.uuid4().hex[:12]}"
    storage.write_bytes(temporary, data)
    try:
        os.replace(os.path.join(storage.root, temporary),
                   os.path.join(storage.root, RUN_METADATA_NAME))
    except BaseException:
        storage.delete(temporary)
        raise
    storage.sync_dir("")
