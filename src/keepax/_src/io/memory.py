"""In-memory storage (``memory://name``), for tests and for short-lived checkpoints.

Stores are kept in a process-wide registry by name, so that a checkpoint saved to
``memory://runs/a`` can be restored from the same URL later in the process; drop one with
:func:`clear`. Nothing survives the process.
"""

from __future__ import annotations

import threading

from keepax._src.io.base import Reader, Storage, Writer

__all__ = ["MemoryStorage", "clear"]

_LOCK = threading.Lock()
_STORES: dict[str, dict[str, bytes]] = {}


def clear(name: str | None = None) -> None:
    """Drops the in-memory store ``name`` (the part after ``memory://`` up to the first ``/``),
    or every store when ``name`` is None."""
    with _LOCK:
        if name is None:
            _STORES.clear()
        else:
            _STORES.pop(name, None)


class _MemoryWriter(Writer):
    def __init__(self, files: dict[str, bytes], key: str) -> None:
        self._files, self._key = files, key
        self._parts: list[bytes] = []

    def write(self, data: memoryview) -> None:
        self._parts.append(bytes(data))

    def close(self) -> None:
        with _LOCK:
            self._files[self._key] = b"".join(self._parts)
        self._parts = []

    def abort(self) -> None:
        self._parts = []


class _MemoryReader(Reader):
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read_into(self, offset: int, out: memoryview) -> int:
        out = out.cast("B") if out.ndim != 1 or out.format != "B" else out
        piece = self._data[offset : offset + len(out)]
        out[: len(piece)] = piece
        return len(piece)

    def size(self) -> int:
        return len(self._data)


class MemoryStorage(Storage):
    """Files held in a dict in this process, under ``memory://store/prefix``."""

    atomic_rename = True

    def __init__(self, url: str) -> None:
        if not url.startswith("memory://"):
            raise ValueError(f"not a memory:// URL: {url!r}")
        self.url = url.rstrip("/")
        rest = url[len("memory://") :].strip("/")
        store, _, prefix = rest.partition("/")
        if not store:
            raise ValueError(f"memory URL needs a store name, as in memory://name: {url!r}")
        with _LOCK:
            self._files = _STORES.setdefault(store, {})
        self._prefix = f"{prefix}/" if prefix else ""

    def _key(self, path: str) -> str:
        return f"{self._prefix}{path}"

    def create(self, path: str) -> Writer:
        return _MemoryWriter(self._files, self._key(path))

    def open(self, path: str) -> Reader:
        with _LOCK:
            data = self._files.get(self._key(path))
        if data is None:
            raise FileNotFoundError(self.display(path))
        return _MemoryReader(data)

    def exists(self, path: str) -> bool:
        return self._key(path) in self._files or self.is_dir(path)

    def is_dir(self, path: str) -> bool:
        prefix = self._key(path).rstrip("/") + "/" if path else self._prefix
        with _LOCK:
            return any(k.startswith(prefix) for k in self._files)

    def list(self, path: str) -> list[str]:
        prefix = self._key(path).rstrip("/") + "/" if path else self._prefix
        with _LOCK:
            keys = [k for k in self._files if k.startswith(prefix)]
        return sorted({k[len(prefix) :].split("/", 1)[0] for k in keys})

    def delete(self, path: str) -> None:
        key = self._key(path)
        with _LOCK:
            for k in [k for k in self._files if k == key or k.startswith(key.rstrip("/") + "/")]:
                del self._files[k]

    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        src, dst = self._key(source).rstrip("/") + "/", self._key(target).rstrip("/") + "/"
        with _LOCK:
            moving = {k: v for k, v in self._files.items() if k.startswith(src)}
            existing = {k: v for k, v in self._files.items() if k.startswith(dst)}
            if existing and not exchange:
                raise FileExistsError(self.display(target))
            for k in list(moving) + list(existing):
                del self._files[k]
            for k, v in moving.items():
                self._files[dst + k[len(src) :]] = v
            for k, v in existing.items():
                self._files[src + k[len(dst) :]] = v
