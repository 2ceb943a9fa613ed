"""Storage backends behind one small interface (see ``base.py``)."""

from __future__ import annotations

import os
from typing import Any

from keepax._src.io.base import Reader, Storage, Writer, is_hidden_name
from keepax._src.io.fsspec_store import FsspecStorage
from keepax._src.io.local import LocalStorage
from keepax._src.io.memory import MemoryStorage

__all__ = ["Reader", "Storage", "Writer", "LocalStorage", "MemoryStorage", "FsspecStorage",
           "is_hidden_name", "open_root", "split_checkpoint_path"]


def _fsspec_protocol(text: str) -> str | None:
    """The scheme of a URL that fsspec handles (``s3``, ``gs``, ...), or None for local paths
    and ``memory://`` (keepax's own in-process store)."""
    if "://" not in text or text.startswith(("file://", "memory://")):
        return None
    scheme = text.split("://", 1)[0]
    import fsspec  # noqa: PLC0415 - only for URLs

    if scheme not in fsspec.available_protocols():
        raise ValueError(
            f"storage URL scheme {scheme!r} is not supported in {text!r}: use a local path, "
            "memory://name, or a URL fsspec knows (s3://bucket/prefix, gs://bucket/prefix, ...)"
        )
    return scheme


def open_root(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Storage:
    """Returns the storage rooted at a directory path or URL.

    Args:
      url: A local directory, ``file://...``, ``memory://store/prefix``, or any URL fsspec
        knows (``s3://bucket/prefix``, ``gs://bucket/prefix``, ...).
      storage_options: For fsspec URLs: options of the file system (e.g. s3fs's
        ``client_kwargs={"endpoint_url": ...}``) and keepax's ``keepax_*`` transfer options
        (see ``fsspec_store``). Ignored for local and memory paths.
    """
    text = os.fspath(url)
    if text.startswith("memory://"):
        return MemoryStorage(text)
    if _fsspec_protocol(text) is not None:
        return FsspecStorage(text, storage_options)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalStorage(text)


def split_checkpoint_path(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[Storage, str]:
    """Splits a checkpoint path into the storage of its parent and its own name."""
    text = os.fspath(path).rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not text:
        raise ValueError("empty checkpoint path")
    if _fsspec_protocol(text) is not None:
        scheme, rest = text.split("://", 1)
        parent, _, name = rest.rpartition("/")
        if not parent or not name:
            raise ValueError(
                f"a checkpoint URL needs a bucket and a name, as in {scheme}://bucket/name: "
                f"{text!r}"
            )
        return FsspecStorage(f"{scheme}://{parent}", storage_options), name
    if text.startswith("memory://"):
        rest = text[len("memory://") :]
        parent, _, name = rest.rpartition("/")
        if not parent or not name:
            raise ValueError(
                f"a memory checkpoint path needs a store and a name, as in memory://store/name: "
                f"{text!r}"
            )
        return MemoryStorage(f"memory://{parent}"), name
    parent, name = os.path.split(os.path.abspath(text))
    storage = open_root(parent)
    storage.url = os.path.dirname(text) or "."
    return storage, name
