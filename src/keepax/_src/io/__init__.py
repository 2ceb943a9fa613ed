"""Storage backends behind one small interface (see ``base.py``)."""

from __future__ import annotations

import os
from typing import Any

from keepax._src.io.base import Reader, Storage, Writer, is_hidden_name, with_path
from keepax._src.io.fsspec_store import FsspecStorage
from keepax._src.io.local import LocalStorage
from keepax._src.io.memory import MemoryStorage
from keepax.errors import InvalidPathError

__all__ = ["Reader", "Storage", "Writer", "LocalStorage", "MemoryStorage", "FsspecStorage",
           "is_hidden_name", "with_path", "open_root", "split_checkpoint_path"]


def _fsspec_protocol(text: str) -> str | None:
    """The scheme of a URL that fsspec handles (``s3``, ``gs``, ...), or None for local paths
    and ``memory://`` (keepax's own in-process store)."""
    if "://" not in text or text.startswith(("file://", "memory://")):
        return None
    scheme = text.split("://", 1)[0]
    import fsspec  # noqa: PLC0415 - only for URLs

    if scheme not in fsspec.available_protocols():
        raise InvalidPathError(
            f"storage URL scheme {scheme!r} is not supported: use a local path, "
            "memory://name, or a URL fsspec knows (s3://bucket/prefix, gs://bucket/prefix, ...)",
            path=text,
        )
    return scheme


def _follow_symlinks(storage_options: dict[str, Any] | None) -> bool:
    """The ``keepax_follow_symlinks`` storage option of a local path (default False)."""
    value = (storage_options or {}).get("keepax_follow_symlinks", False)
    if not isinstance(value, bool):
        raise ValueError(f"keepax_follow_symlinks must be True or False, got {value!r}")
    return value


def open_root(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Storage:
    """Returns the storage rooted at a directory path or URL.

    Args:
      url: A local directory, ``file://...``, ``memory://store/prefix``, or any URL fsspec
        knows (``s3://bucket/prefix``, ``gs://bucket/prefix``, ...).
      storage_options: For fsspec URLs: options of the file system (e.g. s3fs's
        ``client_kwargs={"endpoint_url": ...}``) and keepax's ``keepax_*`` transfer options
        (see ``fsspec_store``). For local paths only ``keepax_follow_symlinks`` applies
        (``LocalStorage``: read through symbolic links that lead out of a checkpoint; off by
        default). Ignored for memory paths.

    Raises:
      InvalidPathError: A URL scheme keepax cannot store to.
    """
    text = os.fspath(url)
    if text.startswith("memory://"):
        return MemoryStorage(text)
    if _fsspec_protocol(text) is not None:
        return FsspecStorage(text, storage_options)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalStorage(text, follow_symlinks=_follow_symlinks(storage_options))


def split_checkpoint_path(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[Storage, str]:
    """Splits a checkpoint path into the storage of its parent and its own name.

    A local storage is rooted at the parent directory, so its reads stay inside the
    checkpoint's own entry (``LocalStorage``: symbolic links out of it are refused).

    Raises:
      InvalidPathError: An empty path, a URL scheme keepax cannot store to, or a URL without
        a name under its bucket or store.
    """
    text = os.fspath(path).rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not text:
        raise InvalidPathError("empty checkpoint path")
    if _fsspec_protocol(text) is not None:
        scheme, rest = text.split("://", 1)
        parent, _, name = rest.rpartition("/")
        if not parent or not name:
            raise InvalidPathError(
                f"a checkpoint URL needs a bucket and a name, as in {scheme}://bucket/name",
                path=text,
            )
        return FsspecStorage(f"{scheme}://{parent}", storage_options), name
    if text.startswith("memory://"):
        rest = text[len("memory://") :]
        parent, _, name = rest.rpartition("/")
        if not parent or not name:
            raise InvalidPathError(
                "a memory checkpoint path needs a store and a name, as in memory://store/name",
                path=text,
            )
        return MemoryStorage(f"memory://{parent}"), name
    parent, name = os.path.split(os.path.abspath(text))
    storage = open_root(parent, storage_options)
    storage.url = os.path.dirname(text) or "."
    return storage, name
