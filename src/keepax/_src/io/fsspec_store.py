"""Object stores and other fsspec file systems (``s3://``, ``gs://``, ...): the *marker* commit.

Object stores cannot rename a directory atomically, so a checkpoint is written in place and the
commit marker, written last, alone makes it visible (``docs/FORMAT.md`` §3.1, *Marker
backends*). :meth:`FsspecStorage.begin_write` deletes an old marker before anything of an old
checkpoint is touched, and a directory without a marker is never a checkpoint.

S3 (``s3://``, through s3fs's session and event loop) has a fast path of its own:

- writes: a file smaller than one part is one ``PutObject`` on close; a larger one is a
  multipart upload whose parts are uploaded while the next part is filled, at most
  ``max_concurrency`` parts in flight per storage (memory: about ``(max_concurrency + files
  being written) * part_size``). ``close`` completes the upload, ``abort`` aborts it, so an
  interrupted file never becomes visible.
- reads: ranged ``GetObject``s only for the bytes asked for; a large range is split into
  ``read_size`` sub-ranges fetched concurrently, each streamed straight into its destination.
- every request is retried, with exponential backoff and jitter, on throttling (``SlowDown``),
  server errors (HTTP 5xx) and dropped or refused connections, up to ``max_attempts`` attempts;
  then, or at once for a permanent error (no bucket, access denied), an ``OSError`` names the
  URL. botocore's own retries are turned off (unless ``config_kwargs`` sets ``retries``) so
  that the number of attempts is ours.

Other fsspec file systems go through the generic fsspec API (``open``, ``cat_file``, ``ls``,
``rm``), with the same retries for connection errors.

Options of keepax's own, given among ``storage_options`` (all others go to fsspec/s3fs):

- ``keepax_part_size``: bytes per upload part (default 16 MiB; S3 needs at least 5 MiB). A
  file smaller than one part is uploaded with one ``PutObject``.
- ``keepax_read_size``: at most this many bytes per ranged GET; larger ranges are split into
  concurrent GETs (default 64 MiB).
- ``keepax_max_concurrency``: requests moving data at once, per storage (default 8).
- ``keepax_max_attempts``: attempts per request before giving up (default 5).
- ``keepax_retry_delay``: first backoff in seconds, doubled per attempt up to 5 s (default 0.1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import errno
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from keepax._src.io.base import COMMIT_NAME, Reader, Storage, Writer

__all__ = ["FsspecStorage", "TransferOptions", "split_options"]

_MiB = 1 << 20
_KEEPAX_MANIFEST = "manifest.json"
_KEEPAX_DATA = "data"
_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1000 keys


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    """How data moves (see the module docstring for the ``keepax_*`` option names)."""

    part_size: int = 16 * _MiB
    read_size: int = 64 * _MiB
    max_concurrency: int = 8
    max_attempts: int = 5
    retry_delay: float = 0.1
    max_retry_delay: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.part_size, int) or self.part_size < 5 * _MiB:
            raise ValueError(
                f"keepax_part_size must be an integer >= 5 MiB (S3's smallest part), got "
                f"{self.part_size!r}"
            )
        if not isinstance(self.read_size, int) or self.read_size < _MiB:
            raise ValueError(f"keepax_read_size must be an integer >= 1 MiB, got "
                             f"{self.read_size!r}")
        for name in ("max_concurrency", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"keepax_{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.retry_delay, (int, float)) and 0 <= self.retry_delay <= 60):
            raise ValueError(f"keepax_retry_delay must be 0..60 seconds, got {self.retry_delay!r}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based), with jitter."""
        delay = min(self.max_retry_delay, self.retry_delay * (2**attempt))
        return delay * (0.5 + random.random() / 2)


def split_options(
    storage_options: dict[str, Any] | None,
) -> tuple[dict[str, Any], TransferOptions]:
    """Separates keepax's ``keepax_*`` options from those meant for fsspec.

    Raises:
      ValueError: An unknown ``keepax_*`` option or an invalid value.
    """
    fs_options = dict(storage_options or {})
    ours = {k[len("keepax_") :]: fs_options.pop(k) for k in list(fs_options)
            if k.startswith("keepax_")}
    known = {f.name for f in dataclasses.fields(TransferOptions)} - {"max_retry_delay"}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise ValueError(
            f"unknown storage option(s) {', '.join('keepax_' + k for k in unknown)}; keepax's "
            f"own are {', '.join(sorted('keepax_' + k for k in known))}"
        )
    return fs_options, TransferOptions(**ours)


# ---------------------------------------------------------------------------------------------
# Errors: which are worth retrying, and what the user sees.


def _status_and_code(error: BaseException) -> tuple[int | None, str]:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, str(response.get("Error", {}).get("Code", ""))


_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "ExpiredToken",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_DENIED_CODES = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidToken",
}


def _is_transient(error: BaseException) -> bool:
    """Throttling, server errors and connection trouble: worth another attempt."""
    status, code = _status_and_code(error)
    if status is not None or code:
        return code in _TRANSIENT_CODES or (status is not None and status >= 500) or status == 429
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError, _ShortRead)):
        return True
    # botocore's connection errors (refused, reset, closed, timed out) and aiohttp's
    # payload errors, by module, so that neither needs importing here.
    module = type(error).__module__ or ""
    name = type(error).__name__
    if module.startswith("botocore") and (
        "Connection" in name or "Timeout" in name or name in (
            "IncompleteReadError", "ResponseStreamingError", "HTTPClientError",
            "ProxyConnectionError",
        )
    ):
        return True
    return module.startswith("aiohttp") and isinstance(error, Exception)


def _translate(error: BaseException, url: str, what: str, attempts: int) -> OSError:
    """The exception a caller sees for a request that failed for good."""
    status, code = _status_and_code(error)
    message = str(error)
    if code == "NoSuchBucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return _NoBucket(
            errno.ENOENT, f"the bucket {bucket!r} does not exist; create it or fix the URL", url
        )
    if code in _MISSING_CODES or status == 404:
        return FileNotFoundError(errno.ENOENT, "no such object", url)
    if code in _DENIED_CODES or status == 403:
        return PermissionError(
            errno.EACCES,
            f"access denied by the object store ({code or status}: {message}); check the "
            "credentials (AWS_* environment variables, ~/.aws, or storage_options) and the "
            "bucket's permissions",
            url,
        )
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return error
    if _is_transient(error):
        return OSError(
            errno.EIO,
            f"{what} failed after {attempts} attempt{'s' if attempts != 1 else ''} "
            f"({type(error).__name__}: {message}); is the object store reachable? Raise "
            "storage_options={'keepax_max_attempts': ...} to retry longer",
            url,
        )
    return OSError(errno.EIO, f"{what} failed ({type(error).__name__}: {message})", url)


class _NoBucket(FileNotFoundError):
    """The bucket itself does not exist (not merely the object)."""


class _ShortRead(Exception):
    """A response body ended before its range did (a dropped connection)."""


# ---------------------------------------------------------------------------------------------
# Transports: S3 through aiobotocore (fast path), anything else through fsspec's API.


class _S3:
    """Raw S3 requests on s3fs's client and event loop, with our retries."""

    def __init__(self, fs: Any, bucket: str, options: TransferOptions, url: str) -> None:
        self.fs, self.bucket, self.options, self.url = fs, bucket, options, url
        self._semaphore: asyncio.Semaphore | None = None

    # -- running coroutines from caller threads ------------------------------------------

    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.submit(coro).result()

    async def _client(self) -> Any:
        await self.fs.set_session()
        return await self.fs.get_s3(self.bucket)

    async def call(
        self, method: str, key: str, *, what: str, read_into: Sequence[memoryview] | None = None,
        limit: bool = False, **kwargs: Any,
    ) -> Any:
        """One request (``method`` on ``key``), retried; with ``read_into``, the response
        body is streamed into those buffers (which it must fill exactly)."""
        url = f"s3://{self.bucket}/{key}"
        attempts = self.options.max_attempts
        for attempt in range(attempts):
            try:
                if limit:
                    if self._semaphore is None:
                        self._semaphore = asyncio.Semaphore(self.options.max_concurrency)
                    async with self._semaphore:
                        return await self._once(method, key, read_into, kwargs)
                return await self._once(method, key, read_into, kwargs)
            except Exception as e:  # noqa: BLE001 - classified below
                if attempt + 1 < attempts and _is_transient(e):
                    await asyncio.sleep(self.options.backoff(attempt))
                    continue
                raise _translate(e, url, what, attempt + 1) from e
        raise AssertionError("unreachable")

    async def _once(
        self, method: str, key: str, read_into: Sequence[memoryview] | None,
        kwargs: dict[str, Any],
    ) -> Any:
        client = await self._client()
        response = await getattr(client, method)(Bucket=self.bucket, Key=key, **kwargs)
        if read_into is None:
            return response
        body = response["Body"]
        try:
            for out in read_into:
                done = 0
                while done < len(out):
                    chunk = await body.read(min(len(out) - done, 4 * _MiB))
                    if not chunk:
                        raise _ShortRead(f"response ended {len(out) - done} bytes early")
                    out[done : done + len(chunk)] = chunk
                    done += len(chunk)
        finally:
            body.close()
        return response

    async def list_page(self, prefix: str, token: str | None, delimiter: bool) -> Any:
        kwargs: dict[str, Any] = {"Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        if token:
            kwargs["ContinuationToken"] = token
        url = f"s3://{self.bucket}/{prefix}"
        attempts = self.options.max_attempts
        for attempt in range(attempts):
            try:
                client = await self._client()
                return await client.list_objects_v2(Bucket=self.bucket, **kwargs)
            except Exception as e:  # noqa: BLE001 - classified below
                if attempt + 1 < attempts and _is_transient(e):
                    await asyncio.sleep(self.options.backoff(attempt))
                    continue
                raise _translate(e, url, "listing", attempt + 1) from e
        raise AssertionError("unreachable")

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[dict[str, Any]], list[str]]:
        """Every object (Key, Size, LastModified) and common prefix under ``prefix``."""
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        token = None
        while True:
            page = self.run(self.list_page(prefix, token, delimiter))
            objects.extend(page.get("Contents", []))
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return objects, prefixes

    async def delete_keys(self, keys: list[str]) -> None:
        url = f"s3://{self.bucket}/{keys[0]}" if keys else f"s3://{self.bucket}"
        attempts = self.options.max_attempts
        for attempt in range(attempts):
            try:
                client = await self._client()
                response = await client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                )
                failed = response.get("Errors", [])
                if failed:
                    first = failed[0]
                    raise OSError(
                        errno.EIO,
                        f"could not delete {len(failed)} object(s), first "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                        url,
                    )
                return
            except Exception as e:  # noqa: BLE001 - classified below
                if attempt + 1 < attempts and _is_transient(e):
                    await asyncio.sleep(self.options.backoff(attempt))
                    continue
                if isinstance(e, OSError) and not _status_and_code(e)[1]:
                    raise
                raise _translate(e, url, "deleting", attempt + 1) from e


class _S3Writer(Writer):
    """One object: a single PUT if small, else a multipart upload with parts in flight."""

    def __init__(self, s3: _S3, key: str, slots: threading.BoundedSemaphore) -> None:
        self._s3, self._key, self._slots = s3, key, slots
        self._size = s3.options.part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future] = []
        self._done = False

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        while len(data):
            room = self._size - len(self._buffer)
            self._buffer += data[:room]
            data = data[room:]
            if len(self._buffer) >= self._size:
                self._send_part()

    def _send_part(self) -> None:
        for part in self._parts:  # fail early if an earlier part failed for good
            if part.done() and part.exception() is not None:
                part.result()
        if self._upload_id is None:
            response = self._s3.run(
                self._s3.call("create_multipart_upload", self._key, what="starting an upload")
            )
            self._upload_id = response["UploadId"]
        # (bytes: aiohttp sends bytes as they are, and warns about large bytearrays.)
        body, self._buffer = bytes(self._buffer), bytearray()
        number = len(self._parts) + 1
        self._slots.acquire()
        try:
            future = self._s3.submit(self._s3.call(
                "upload_part", self._key, what=f"uploading part {number}",
                UploadId=self._upload_id, PartNumber=number, Body=body,
            ))
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)

    def close(self) -> None:
        if self._done:
            return
        if self._upload_id is None:
            body, self._buffer = bytes(self._buffer), bytearray()
            self._s3.run(self._s3.call("put_object", self._key, what="writing", Body=body))
            self._done = True
            return
        if self._buffer:
            self._send_part()
        try:
            etags = [part.result()["ETag"] for part in self._parts]
            self._s3.run(self._s3.call(
                "complete_multipart_upload", self._key, what="completing an upload",
                UploadId=self._upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]
                },
            ))
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        for part in self._parts:
            part.cancel()
        concurrent.futures.wait(self._parts)
        if self._upload_id is not None:
            try:
                self._s3.run(self._s3.call(
                    "abort_multipart_upload", self._key, what="aborting an upload",
                    UploadId=self._upload_id,
                ))
            except OSError:
                pass  # An unfinished multipart upload is invisible; the bucket's lifecycle
                # rules (AbortIncompleteMultipartUpload) reclaim its parts.


class _S3Reader(Reader):
    """Ranged GETs of one object; large ranges in concurrent sub-ranges."""

    def __init__(self, s3: _S3, key: str, size: int) -> None:
        self._s3, self._key, self._size = s3, key, size

    def read_into(self, offset: int, out: memoryview) -> int:
        return self.readv_into(offset, [out])

    def readv_into(self, offset: int, outs: list[memoryview]) -> int:
        views = [o.cast("B") if o.ndim != 1 or o.format != "B" else o for o in outs]
        total = max(0, min(sum(len(v) for v in views), self._size - offset))
        if total == 0:
            return 0
        # Cut the destination into pieces of at most read_size: one ranged GET per piece.
        step = self._s3.options.read_size
        pieces: list[tuple[int, list[memoryview]]] = []
        current: list[memoryview] = []
        current_start, current_len, left = offset, 0, total
        for view in views:
            view = view[:left]
            left -= len(view)
            while len(view):
                take = min(len(view), step - current_len)
                current.append(view[:take])
                current_len += take
                view = view[take:]
                if current_len == step:
                    pieces.append((current_start, current))
                    current_start += current_len
                    current, current_len = [], 0
            if left == 0:
                break
        if current_len:
            pieces.append((current_start, current))
        futures = [
            self._s3.submit(self._s3.call(
                "get_object", self._key, what="reading", read_into=bufs, limit=True,
                Range=f"bytes={start}-{start + sum(len(b) for b in bufs) - 1}",
            ))
            for start, bufs in pieces
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise
        return total

    def size(self) -> int:
        return self._size


class _FsspecWriter(Writer):
    """Any fsspec file system: its own buffered file (uploaded on close)."""

    def __init__(self, fs: Any, path: str, options: TransferOptions) -> None:
        self._fs, self._path = fs, path
        self._file = fs.open(path, "wb", block_size=options.part_size)

    def write(self, data: memoryview) -> None:
        self._file.write(data.cast("B") if data.ndim != 1 or data.format != "B" else data)

    def close(self) -> None:
        self._file.close()

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
    def __init__(self, storage: FsspecStorage, path: str, size: int) -> None:
        self._storage, self._path, self._size = storage, path, size

    def read_into(self, offset: int, out: memoryview) -> int:
        out = out.cast("B") if out.ndim != 1 or out.format != "B" else out
        end = min(offset + len(out), self._size)
        if end <= offset:
            return 0
        data = self._storage._retry(
            lambda: self._storage.fs.cat_file(self._path, start=offset, end=end),
            self._path, "reading",
        )
        out[: len(data)] = data
        return len(data)

    def size(self) -> int:
        return self._size


# ---------------------------------------------------------------------------------------------
# The storage.


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _epoch(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


class FsspecStorage(Storage):
    """Files under a prefix of an fsspec file system; commits by marker (no rename).

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
        self._s3: _S3 | None = None
        if type(filesystem).__name__ == "S3FileSystem":
            bucket, _, prefix = self._root.partition("/")
            if not bucket:
                raise ValueError(f"an S3 URL needs a bucket, as in s3://bucket/prefix: {url!r}")
            self._s3 = _S3(filesystem, bucket, self.options, self.url)
            self._prefix = f"{prefix}/" if prefix else ""

    # -- paths ---------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return f"{self._root}/{path}" if path else self._root

    def _key(self, path: str) -> str:
        return f"{self._prefix}{path}"

    def _dir_key(self, path: str) -> str:
        return f"{self._prefix}{path}/" if path else self._prefix

    def _retry(self, fn: Callable[[], Any], path: str, what: str) -> Any:
        """Runs a generic fsspec call, retrying connection errors."""
        attempts = self.options.max_attempts
        for attempt in range(attempts):
            try:
                return fn()
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                if attempt + 1 < attempts and _is_transient(e):
                    time.sleep(self.options.backoff(attempt))
                    continue
                raise _translate(e, self.display(path) if path else self.url, what,
                                 attempt + 1) from e
        raise AssertionError("unreachable")

    # -- the interface ---------------------------------------------------------------------

    def create(self, path: str) -> Writer:
        if self._s3 is not None:
            return _S3Writer(self._s3, self._key(path), self._slots)
        full = self._full(path)
        parent = full.rpartition("/")[0]
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        return _FsspecWriter(self.fs, full, self.options)

    def open(self, path: str) -> Reader:
        if self._s3 is not None:
            s3 = self._s3
            try:
                head = s3.run(s3.call("head_object", self._key(path), what="opening"))
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT, "no such object", self.display(path)
                ) from None
            return _S3Reader(s3, self._key(path), int(head["ContentLength"]))
        full = self._full(path)
        info = self._retry(lambda: self.fs.info(full), path, "opening")
        if info.get("type") == "directory":
            raise FileNotFoundError(errno.ENOENT, "a directory, not a file", self.display(path))
        return _FsspecReader(self, full, int(info["size"]))

    def write_bytes(self, path: str, data: bytes) -> None:
        if self._s3 is not None:
            s3 = self._s3
            s3.run(s3.call("put_object", self._key(path), what="writing", Body=bytes(data)))
            return
        super().write_bytes(path, data)

    def exists(self, path: str) -> bool:
        if self._s3 is not None:
            try:
                self._s3.run(self._s3.call("head_object", self._key(path), what="checking"))
                return True
            except _NoBucket:
                raise
            except FileNotFoundError:
                pass
            return self.is_dir(path)
        full = self._full(path)
        return bool(self._retry(lambda: self.fs.exists(full), path, "checking"))

    def is_dir(self, path: str) -> bool:
        if self._s3 is not None:
            page = self._s3.run(self._s3.list_page(self._dir_key(path), None, True))
            return bool(page.get("Contents") or page.get("CommonPrefixes"))
        full = self._full(path)
        return bool(self._retry(lambda: self.fs.isdir(full), path, "checking"))

    def list(self, path: str) -> list[str]:
        if self._s3 is not None:
            prefix = self._dir_key(path)
            objects, prefixes = self._s3.list(prefix, delimiter=True)
            names = {o["Key"][len(prefix) :] for o in objects}
            names.update(p[len(prefix) :].rstrip("/") for p in prefixes)
            names.discard("")
            return sorted(names)
        full = self._full(path)
        try:
            entries = self._retry(
                lambda: self.fs.ls(full, detail=False, refresh=True), path, "listing"
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        if entries == [full] and not self.fs.isdir(full):
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def _objects(self, path: str) -> list[dict[str, Any]]:
        """Every object at ``path`` or below it (S3)."""
        assert self._s3 is not None
        objects, _ = self._s3.list(self._dir_key(path), delimiter=False)
        if path:
            key = self._key(path)
            exact, _ = self._s3.list(key, delimiter=True)
            objects += [o for o in exact if o["Key"] == key]
        return objects

    def delete(self, path: str) -> None:
        """Deletes a file or a directory tree; commit markers go first (FORMAT.md §3.1)."""
        if self._s3 is not None:
            keys = [o["Key"] for o in self._objects(path)]
            markers = [k for k in keys if k.rsplit("/", 1)[-1] == COMMIT_NAME]
            rest = [k for k in keys if k.rsplit("/", 1)[-1] != COMMIT_NAME]
            for group in (markers, rest):
                batches = [
                    group[i : i + _DELETE_BATCH] for i in range(0, len(group), _DELETE_BATCH)
                ]
                for future in [self._s3.submit(self._s3.delete_keys(b)) for b in batches]:
                    future.result()
            if path.rsplit("/", 1)[-1] != COMMIT_NAME:
                self._abort_uploads(path)
            return
        full = self._full(path)
        if not self.fs.exists(full):
            return
        if self.fs.isdir(full):
            marker = f"{full}/{COMMIT_NAME}"
            if self.fs.exists(marker):
                self._retry(lambda: self.fs.rm(marker), path, "deleting")
            self._retry(lambda: self.fs.rm(full, recursive=True), path, "deleting")
        else:
            self._retry(lambda: self.fs.rm(full), path, "deleting")

    def _abort_uploads(self, path: str) -> None:
        """Aborts unfinished multipart uploads under a directory (a save that died mid-file
        could not abort its own); their parts would otherwise be stored, invisibly."""
        assert self._s3 is not None
        s3 = self._s3

        async def uploads() -> list[tuple[str, str]]:
            client = await s3._client()
            found: list[tuple[str, str]] = []
            kwargs: dict[str, Any] = {"Bucket": s3.bucket, "Prefix": self._dir_key(path)}
            while True:
                page = await client.list_multipart_uploads(**kwargs)
                found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
                if not page.get("IsTruncated"):
                    return found
                kwargs["KeyMarker"] = page.get("NextKeyMarker")
                kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

        try:
            pending = s3.run(uploads())
        except Exception:  # noqa: BLE001 - optional clean-up (some stores lack the call)
            return
        futures = [
            s3.submit(s3.call("abort_multipart_upload", key, what="aborting an upload",
                              UploadId=upload))
            for key, upload in pending
        ]
        for future in futures:
            try:
                future.result()
            except FileNotFoundError:
                pass  # finished or aborted meanwhile

    def rename_dir(self, source: str, target: str, *, exchange: bool = False) -> None:
        raise NotImplementedError(
            f"{self.url}: object stores have no atomic rename; keepax commits by marker here"
        )

    def modified(self, path: str) -> float | None:
        if self._s3 is not None:
            times = [_epoch(o.get("LastModified")) for o in self._objects(path)]
        else:
            full = self._full(path)
            try:
                found = self.fs.find(full, detail=True, withdirs=False)
            except FileNotFoundError:
                return None
            times = [
                _epoch(info.get("LastModified", info.get("mtime", info.get("created"))))
                for info in found.values()
            ]
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def is_unfinished(self, name: str) -> bool:
        entries = self.list(name)
        return bool(entries) and COMMIT_NAME not in entries and set(entries) <= {
            _KEEPAX_MANIFEST, _KEEPAX_DATA,
        }

    def begin_write(self, name: str, *, replace: bool) -> None:
        entries = self.list(name)
        if not entries:
            if self._s3 is not None:
                self._abort_uploads(name)  # of an earlier save that died mid-file
            return
        if COMMIT_NAME in entries:
            if not replace:
                raise FileExistsError(errno.EEXIST, "a checkpoint exists", self.display(name))
            # The marker first: from here on no reader takes the old files for a checkpoint.
            self.delete(f"{name}/{COMMIT_NAME}")
        elif not replace and not self.is_unfinished(name):
            raise FileExistsError(errno.EEXIST, "something else exists here", self.display(name))
        self.delete(name)


def _s3_defaults(fs_options: dict[str, Any], options: TransferOptions) -> dict[str, Any]:
    """Turns botocore's own retries off (ours count the attempts) and sizes its connection
    pool for ``max_concurrency`` requests, unless the caller configured them."""
    config = dict(fs_options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    # keepax checksums every chunk itself (CRC-32C, checked on every read): S3's own
    # checksums of whole requests would only cost CPU.
    config.setdefault("request_checksum_calculation", "when_required")
    config.setdefault("response_checksum_validation", "when_required")
    config.setdefault("max_pool_connections", max(10, 2 * options.max_concurrency + 4))
    return {**fs_options, "config_kwargs": config}
