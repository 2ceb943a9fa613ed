"""Storage backends behind one small interface (see ``base.py``)."""

from __future__ import annotations

import os

from keepax._src.storage.base import Reader, Storage, Writer, is_hidden_name
from keepax._src.storage.local import LocalStorage
from keepax._src.storage.memory import MemoryStorage

__all__ = ["Reader", "Storage", "Writer", "LocalStorage", "MemoryStorage", "is_hidden_name",
           "open_root", "split_checkpoint_path"]


def open_root(url: str | os.PathLike[str]) -> Storage:
    """Returns the storage rooted at a directory path or URL."""
    text = os.fspath(url)
    if text.startswith("memory://"):
        return MemoryStorage(text)
    if "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise ValueError(
            f"storage URL scheme {scheme!r} is not supported yet in {text!r}; use a local path "
            "or memory://name"
        )
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalStorage(text)


def split_checkpoint_path(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """Splits a checkpoint path into the storage of its parent and its own name."""
    text = os.fspath(path).rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not text:
        raise ValueError("empty checkpoint path")
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
