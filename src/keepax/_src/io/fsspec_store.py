"""Object stores and other fsspec file systems (``s3://``, ``gs://``, ...).

Object stores cannot rename a directory atomically (:attr:`FsspecStorage.atomic_rename` is
false): a commit protocol writes in place and makes a checkpoint visible with a small object
written last (:meth:`~keepax._src.io.base.Storage.write_bytes`, one ``PutObject`` on S3, seen
whole or not at all).

S3 (``s3://``, through s3fs's session and event loop) has a fast path of its own
(``s3.py``): ranged, concurrent reads and multipart uploads, with requests retried by
botocore's *standard* retry mode. Other fsspec file systems go through the generic fsspec API
(``open``, ``cat_file``, ``ls``, ``rm``), whose libraries retry by themselves.

Options of keepax's own, given among ``storage_options`` (all others go to fsspec/s3fs):

- ``keepax_part_size``: bytes per upload part (default 16 MiB; S3 needs at least 5 MiB). A
  file smaller than one part is uploaded with one ``PutObject``.
- ``keepax_read_size``: at most this many bytes per ranged GET; larger ranges are split into
  concurrent GETs (default 64 MiB).
- ``keepax_max_concurrency``: requests moving data at once, per storage (default 8).
- ``keepax_max_attempts``: attempts per request, retries included (default 5): botocore's
  ``max_attempts``, and the attempts at a response body that dies mid-stream.
- ``keepax_retry_delay``: first backoff in seconds when a response body dies mid-stream,
  doubled per attempt up to 5 s (default 0.1). botocore backs off requests by itself.
- ``keepax_connect_timeout``: seconds to wait for a connection to the endpoint (default 5).
- ``keepax_read_timeout``: seconds to wait for the endpoint to answer a request, or to send
  the next bytes of an answer (default 10). A stalled endpoint (one that accepts connections
  but never answers) fails a request after about ``max_attempts * read_timeout`` seconds plus
  botocore's backoff (about a minute by default), with an error that says it stopped
  answering. Raise it for endpoints that are slow to answer big requests.
- ``keepax_follow_symlinks``: for local paths (``LocalStorage``); ignored here (object
  stores have no symbolic links).

A ``config_kwargs`` entry of the caller's own (``retries``, ``connect_timeout``,
``read_timeout``, ...) takes precedence over what keepax derives from these.
"""

from __future__ import annotations

import builtins
import errno
import threading
from collections.abc import Callable
from typing import Any

from keepax._src.io.base import Reader, Storage, Writer, with_path
from keepax._src.io.options import TransferOptions, split_options
from keepax._src.io.s3 import NoBucketError, S3Reader, S3Transport, S3Writer, epoch

__all__ = ["FsspecStorage"]



def _s3_defaults(fs_options: dict[str, Any], options: TransferOptions) -> dict[str, Any]:
    """botocore's standard retry mode with ``max_attempts``, keepax's timeouts, and a
    connection pool sized for ``max_concurrency`` requests, unless the caller set them."""
    config = dict(fs_options.get("config_kwargs") or {})
    # (botocore's "max_attempts" counts retries only; "total_max_attempts" counts them all.)
    config.setdefault(
        "retries", {"mode": "standard", "total_max_attempts": options.max_attempts}
    )
    config.setdefault("connect_timeout", options.connect_timeout)
    config.setdefault("read_timeout", options.read_timeout)
    # keepax checksums every chunk itself (CRC-32C, checked on every read): S3's own
    # checksums of whole requests would only cost CPU.
    config.setdefault("request_checksum_calculation", "when_required")
    config.setdefault("response_checksum_validation", "when_required")
    config.setdefault("max_pool_connections", max(10, 2 * options.max_concurrency + 4))
    return {**fs_options, "config_kwargs": config}


# ---------------------------------------------------------------------------------------------
# Any fsspec file system, through its own API.


def _generic(fn: Callable[[], Any], what: str, where: str) -> Any:
    """Runs a generic fsspec call; a failure names ``where`` (its library retried it)."""
    try:
        return fn()
    except OSError as e:
        raise with_path(e, what, where) from e
    except Exception as e:
        raise OSError(errno.EIO, f"{what} failed ({type(e).__name__}: {e})", where) from e


class _FsspecWriter(Writer):
    """Any fsspec file system: its own buffered file (uploaded on close)."""

    def __init__(self, fs: Any, path: str, options: TransferOptions, where: str) -> None:
        self._fs, self._path, self._where = fs, path, where
        self._file = _generic(lambda: fs.open(path, "wb", block_size=options.part_size),
                              "creating", where)

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        _generic(lambda: self._file.write(data), "writing", self._where)

    def close(self) -> None:
        _generic(self._file.close, "writing", self._where)

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        if callable(discard):
            discard()  # fsspec's buffered files: nothing uploaded becomes visible
        try:
            if self._fs.exists(self._path):  # file systems that create the file on open
                self._fs.rm(self._path)
        except OSError:
            pass  # Best effort: the checkpoint holding it is never committed.


class _FsspecReader(Reader):
    def __init__(self, fs: Any, path: str, size: int, where: str) -> None:
        self._fs, self._path, self._size, self._where = fs, path, size, where

    def read_into(self, offset: int, out: memoryview) -> int:
        out = out.cast("B") if out.ndim != 1 or out.format != "B" else out
        end = min(offset + len(out), self._size)
        if end <= offset:
            return 0
        data = _generic(lambda: self._fs.cat_file(self._path, start=offset, end=end),
                        "reading", self._where)
        out[: len(data)] = data
        return len(data)

    def size(self) -> int:
        return self._size


# ---------------------------------------------------------------------------------------------
# The storage.


class FsspecStorage(Storage):
    """Files under a prefix of an fsspec file system (no atomic rename).

    Args:
      url: The root, e.g. ``s3://bucket/runs/a`` or ``gs://bucket/x``.
      storage_options: Passed to fsspec (e.g. s3fs's ``client_kwargs``, ``key``, ``secret``,
        ``profile``, ``anon``), less keepax's own ``keepax_*`` options (module docstring).
        Credentials and endpoints otherwise come from the usual places (for S3: ``AWS_*``
        environment variables, ``~/.aws``, instance metadata).
      filesystem: An fsspec file system to use instead of resolving ``url`` (tests).

    Raises:
      ValueError: An invalid ``keepax_*`` option, or a URL without a bucket.
      ImportError: The file system's package (s3fs, gcsfs, ...) is not installed.
    """

    atomic_rename = False

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, *,
        filesystem: Any = None,
    ) -> None:
        import fsspec

        self.url = url.rstrip("/")
        fs_options, self.options = split_options(storage_options)
        if filesystem is None:
            protocol = url.split("://", 1)[0]
            if protocol in ("s3", "s3a"):
                fs_options = _s3_defaults(fs_options, self.options)
            try:
                filesystem, root = fsspec.url_to_fs(url, **fs_options)
            except ImportError as e:
                raise ImportError(
                    f"{url}: the {protocol}:// file system needs a package that is not installed "
                    f"({e}); for S3: pip install s3fs (or keepax[s3])"
                ) from e
        else:
            root = filesystem._strip_protocol(url)
        self.fs = filesystem
        self._root = root.rstrip("/")
        self._slots = threading.BoundedSemaphore(self.options.max_concurrency)
        self._s3: S3Transport | None = None
        self._prefix = ""
        if type(filesystem).__name__ == "S3FileSystem":
            bucket, _, prefix = self._root.partition("/")
            if not bucket:
                raise ValueError(f"an S3 URL needs a bucket, as in s3://bucket/prefix: {url!r}")
            self._s3 = S3Transport(filesystem, bucket, self.options, self.url)
            self._prefix = f"{prefix}/" if prefix else ""

    # -- paths ---------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return f"{self._root}/{path}" if path else self._root

    def _key(self, path: str) -> str:
        return f"{self._prefix}{path}"

    def _dir_key(self, path: str) -> str:
        return f"{self._prefix}{path}/" if path else self._prefix

    def _call(self, fn: Callable[[], Any], path: str, what: str) -> Any:
        return _generic(fn, what, self.display(path))

    # -- the interface ---------------------------------------------------------------------

    def create(self, path: str) -> Writer:
        if self._s3 is not None:
            return S3Writer(self._s3, self._key(path), self._slots)
        full = self._full(path)
        parent = full.rpartition("/")[0]
        if parent:
            self._call(lambda: self.fs.makedirs(parent, exist_ok=True), path, "creating")
        return _FsspecWriter(self.fs, full, self.options, self.display(path))

    def open(self, path: str) -> Reader:
        if self._s3 is not None:
            s3 = self._s3
            try:
                head = s3.run(s3.call("head_object", self._key(path), what="opening"))
            except NoBucketError:
                raise
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, "no such object", self.display(path)
                ) from None
            return S3Reader(s3, self._key(path), int(head["ContentLength"]))
        full = self._full(path)
        info = self._call(lambda: self.fs.info(full), path, "opening")
        if info.get("type") == "directory":
            raise FileNotFoundError(errno.ENOENT, "a directory, not a file", self.display(path))
        return _FsspecReader(self.fs, full, int(info["size"]), self.display(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        if self._s3 is not None:
            s3 = self._s3
            s3.run(s3.call("put_object", self._key(path), what="writing", Body=bytes(data)))
            return
        super().write_bytes(path, data)

    def exists(self, path: str) -> bool:
        if self._s3 is not None:
            if not self._key(path):
                # The bucket's root: there if the bucket is (NoBucketError otherwise).
                self._s3.run(self._s3.list_page("", None, True))
                return True
            try:
                self._s3.run(self._s3.call("head_object", self._key(path), what="checking"))
                return True
            except NoBucketError:
                raise
            except FileNotFoundError:
                pass
            return self.is_dir(path)
        full = self._full(path)
        return bool(self._call(lambda: self.fs.exists(full), path, "checking"))

    def is_dir(self, path: str) -> bool:
        if self._s3 is not None:
            page = self._s3.run(self._s3.list_page(self._dir_key(path), None, True))
            return bool(page.get("Contents") or page.get("CommonPrefixes"))
        full = self._full(path)
        return bool(self._call(lambda: self.fs.isdir(full), path, "checking"))

    def list(self, path: str) -> builtins.list[str]:
        if self._s3 is not None:
            prefix = self._dir_key(path)
            objects, prefixes = self._s3.list(prefix, delimiter=True)
            names = {o["Key"][len(prefix) :] for o in objects}
            names.update(p[len(prefix) :].rstrip("/") for p in prefixes)
            names.discard("")
            return sorted(names)
        full = self._full(path)
        try:
            entries = self._call(
                lambda: self.fs.ls(full, detail=False, refresh=True), path, "listing"
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        if entries == [full] and not self.fs.isdir(full):
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def _objects(self, path: str) -> builtins.list[dict[str, Any]]:
        """Every object at ``path`` or below it (S3)."""
        assert self._s3 is not None
        objects, _ = self._s3.list(self._dir_key(path), delimiter=False)
        if path:
            key = self._key(path)
            exact, _ = self._s3.list(key, delimiter=True)
            objects += [o for o in exact if o["Key"] == key]
        return objects

    def delete(self, path: str) -> None:
        """Deletes a file or a directory tree, and a tree's unfinished uploads (S3).

        Objects go in no particular order: a caller that needs one file gone first deletes it
        first.
        """
        if self._s3 is not None:
            keys = [o["Key"] for o in self._objects(path)]
            self._s3.delete_keys(keys)
            if keys != [self._key(path)]:  # a directory (or nothing): its uploads too
                self._abort_quietly(path)
            return
        full = self._full(path)
        if not self._call(lambda: self.fs.exists(full), path, "checking"):
            return
        recursive = bool(self._call(lambda: self.fs.isdir(full), path, "checking"))
        self._call(lambda: self.fs.rm(full, recursive=recursive), path, "deleting")

    def _abort_quietly(self, path: str) -> None:
        try:
            self.abort_uploads(path)
        except OSError:
            pass  # optional clean-up; the parts stay invisible

    def uploads(self, path: str = "") -> builtins.list[tuple[str, float | None]]:
        """The unfinished multipart uploads under ``path`` (S3): ``(name, started)``. Other
        file systems have none."""
        if self._s3 is None:
            return []
        skip = len(self._prefix)
        return [(key[skip:], started)
                for key, _, started in self._s3.list_uploads(self._dir_key(path))]

    def abort_uploads(self, path: str = "", *, older_than: float = 0.0) -> int:
        """Aborts the multipart uploads under ``path`` (S3) that started at least
        ``older_than`` seconds ago, e.g. those of a killed save; returns how many. Other file
        systems have none to abort: 0."""
        if self._s3 is None:
            return 0
        return self._s3.abort_uploads(self._dir_key(path), older_than)

    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        raise NotImplementedError(
            f"{self.url}: object stores have no atomic rename; keepax commits by marker here"
        )

    def modified(self, path: str) -> float | None:
        if self._s3 is not None:
            times = [epoch(o.get("LastModified")) for o in self._objects(path)]
        else:
            full = self._full(path)
            try:
                found = self.fs.find(full, detail=True, withdirs=False)
            except FileNotFoundError:
                return None
            times = [
                epoch(info.get("LastModified", info.get("mtime", info.get("created"))))
                for info in found.values()
            ]
        known = [t for t in times if t is not None]
        return max(known) if known else None
