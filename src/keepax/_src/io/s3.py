"""S3 requests on s3fs's client and event loop: the fast path of :class:`FsspecStorage`.

- Every request is retried by botocore itself, in its *standard* retry mode (throttling,
  HTTP 5xx, dropped or refused connections and timeouts; exponential backoff with jitter and
  a retry quota), up to ``max_attempts`` attempts; ``fsspec_store`` configures the client so.
  Then, or at once for a permanent error (no bucket, access denied), an ``OSError`` names the
  URL.
- The one failure botocore cannot retry, a response body that dies mid-stream (its request
  had already succeeded), is retried here: the rest of the range is asked for again
  (:meth:`S3Transport.get_into`).
- Writes: a file smaller than one part is one ``PutObject`` on close; a larger one is a
  multipart upload whose parts are uploaded while the next part is filled, at most
  ``max_concurrency`` parts in flight per storage. ``close`` completes the upload, ``abort``
  aborts it, so an interrupted file never becomes visible.
- Reads: ranged ``GetObject``s only for the bytes asked for; a large range is split into
  ``read_size`` sub-ranges fetched concurrently, each streamed straight into its destination.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import datetime
import errno
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from keepax._src.io.base import Reader, Writer
from keepax._src.io.options import TransferOptions
from keepax.errors import CheckpointNotFoundError

__all__ = ["EndpointTimeoutError", "NoBucketError", "S3Transport", "S3Writer", "S3Reader", "epoch"]

_MiB = 1 << 20
_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1000 keys


class NoBucketError(CheckpointNotFoundError):
    """The bucket itself does not exist (so no checkpoint can be in it)."""


class EndpointTimeoutError(TimeoutError):
    """The object store did not answer in time (it stopped answering, or cannot be reached).

    (A class of its own also because asyncio rebuilds a plain ``TimeoutError`` crossing
    threads from its ``args``, which drops the file name.)
    """


class _ShortRead(Exception):
    """A response body ended before its range did (a dropped connection)."""


# ---------------------------------------------------------------------------------------------
# Errors: what the user sees once botocore has given up.


def _status_and_code(error: BaseException) -> tuple[int | None, str]:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, str(response.get("Error", {}).get("Code", ""))


_THROTTLING_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
    "TooManyRequests", "InternalError", "ServiceUnavailable",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_DENIED_CODES = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidToken",
}
_UNSUPPORTED_CODES = {"NotImplemented", "MethodNotAllowed", "501", "405"}


def _botocore_kind(error: BaseException) -> str:
    """``"connect-timeout"``, ``"read-timeout"``, ``"connection"`` for botocore's transport
    errors (told apart by name, so that botocore need not be imported here), else ``""``."""
    names = {cls.__name__ for cls in type(error).__mro__ if cls.__module__.startswith("botocore")}
    if "ConnectTimeoutError" in names:
        return "connect-timeout"
    if "ReadTimeoutError" in names:
        return "read-timeout"
    if names & {"ConnectionError", "HTTPClientError"}:
        return "connection"
    return ""


def _attempts(error: BaseException, options: TransferOptions) -> int:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
        if isinstance(retries, int):
            return retries + 1
    return options.max_attempts


def _plural(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


def translate(
    error: BaseException, url: str, what: str, options: TransferOptions, endpoint: str = "",
    *, attempts: int | None = None,
) -> OSError:
    """The exception a caller sees for a request that failed for good.

    Args:
      attempts: How many attempts were made, where botocore did not count them (a response
        body retried by keepax); such a failure counts as transient.
    """
    status, code = _status_and_code(error)
    message = str(error)
    if code == "NoSuchBucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return NoBucketError(
            f"the bucket {bucket!r} does not exist; create it or fix the URL", path=url
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
    if isinstance(error, OSError) and error.filename is not None:
        return error
    kind = _botocore_kind(error) or ("read-timeout" if isinstance(error, TimeoutError) else "")
    retried_here = attempts is not None
    attempts = attempts if attempts is not None else _attempts(error, options)
    at = f" at {endpoint}" if endpoint else ""
    if kind == "read-timeout":
        return EndpointTimeoutError(
            errno.ETIMEDOUT,
            f"{what} failed: the object store{at} stopped answering (no response within "
            f"keepax_read_timeout={options.read_timeout:g} s, {_plural(attempts)}); check "
            "that it is up and reachable, or raise storage_options keepax_read_timeout / "
            "keepax_max_attempts",
            url,
        )
    if kind == "connect-timeout":
        return EndpointTimeoutError(
            errno.ETIMEDOUT,
            f"{what} failed: could not connect to the object store{at} within "
            f"keepax_connect_timeout={options.connect_timeout:g} s ({_plural(attempts)}); "
            "is the endpoint right and reachable?",
            url,
        )
    transient = retried_here or bool(kind) or code in _THROTTLING_CODES or (
        status is not None and (status >= 500 or status == 429)
    ) or isinstance(error, (ConnectionError, _ShortRead))
    if transient:
        return OSError(
            errno.EIO,
            f"{what} failed after {_plural(attempts)} ({type(error).__name__}: {message}); "
            "is the object store reachable? Raise storage_options={'keepax_max_attempts': "
            "...} to retry longer",
            url,
        )
    return OSError(errno.EIO, f"{what} failed ({type(error).__name__}: {message})", url)


def epoch(value: Any) -> float | None:
    """A time from a listing (datetime, number or ISO string) as Unix seconds, or None."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return epoch(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# The transport.


class S3Transport:
    """Raw S3 requests of one bucket, on s3fs's client and event loop."""

    def __init__(self, fs: Any, bucket: str, options: TransferOptions, url: str) -> None:
        self.fs, self.bucket, self.options, self.url = fs, bucket, options, url
        self._semaphore: asyncio.Semaphore | None = None
        self._endpoint = ""

    # -- running coroutines from caller threads ------------------------------------------

    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.submit(coro).result()

    async def _client(self) -> Any:
        await self.fs.set_session()
        client = await self.fs.get_s3(self.bucket)
        if not self._endpoint:
            self._endpoint = str(getattr(getattr(client, "meta", None), "endpoint_url", ""))
        return client

    def _fail(
        self, error: BaseException, key: str, what: str, attempts: int | None = None
    ) -> OSError:
        return translate(error, f"s3://{self.bucket}/{key}", what, self.options, self._endpoint,
                         attempts=attempts)

    async def call(self, method: str, key: str, *, what: str, **kwargs: Any) -> Any:
        """One request (``method`` on ``key``), retried by botocore; errors translated."""
        try:
            client = await self._client()
            return await getattr(client, method)(Bucket=self.bucket, Key=key, **kwargs)
        except Exception as e:
            raise self._fail(e, key, what) from e

    async def get_into(self, key: str, start: int, outs: Sequence[memoryview]) -> None:
        """Streams bytes ``start...`` of ``key`` into ``outs`` (which they must fill exactly).

        A body that dies mid-stream is asked for again from where it stopped, up to
        ``max_attempts`` times, with exponential backoff from ``retry_delay``.
        """
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.options.max_concurrency)
        pending = [o for o in outs if len(o)]
        failures = 0
        async with self._semaphore:
            while pending:
                end = start + sum(len(o) for o in pending) - 1
                response = await self.call("get_object", key, what="reading",
                                           Range=f"bytes={start}-{end}")
                body = response["Body"]
                try:
                    while pending:
                        out = pending[0]
                        chunk = await body.read(min(len(out), 4 * _MiB))
                        if not chunk:
                            raise _ShortRead(f"response ended {end + 1 - start} bytes early")
                        out[: len(chunk)] = chunk
                        start += len(chunk)
                        pending[0] = out[len(chunk) :]
                        if not len(pending[0]):
                            pending.pop(0)
                except Exception as e:
                    failures += 1
                    if failures >= self.options.max_attempts:
                        raise self._fail(e, key, "reading", failures) from e
                    await asyncio.sleep(self.options.backoff(failures - 1))
                finally:
                    body.close()

    async def list_page(self, prefix: str, token: str | None, delimiter: bool) -> Any:
        kwargs: dict[str, Any] = {"Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        if token:
            kwargs["ContinuationToken"] = token
        try:
            client = await self._client()
            return await client.list_objects_v2(Bucket=self.bucket, **kwargs)
        except Exception as e:
            raise self._fail(e, prefix, "listing") from e

    def list(
        self, prefix: str, *, delimiter: bool
    ) -> tuple[builtins.list[dict[str, Any]], builtins.list[str]]:
        """Every object (Key, Size, LastModified) and common prefix under ``prefix``."""
        objects: builtins.list[dict[str, Any]] = []
        prefixes: builtins.list[str] = []
        token = None
        while True:
            page = self.run(self.list_page(prefix, token, delimiter))
            objects.extend(page.get("Contents", []))
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return objects, prefixes

    def delete_keys(self, keys: builtins.list[str]) -> None:
        """Deletes objects, in batches of 1000, concurrently."""
        batches = [keys[i : i + _DELETE_BATCH] for i in range(0, len(keys), _DELETE_BATCH)]
        for future in [self.submit(self._delete_batch(b)) for b in batches]:
            future.result()

    async def _delete_batch(self, keys: builtins.list[str]) -> None:
        try:
            client = await self._client()
            response = await client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            )
        except Exception as e:
            raise self._fail(e, keys[0], "deleting") from e
        failed = response.get("Errors", [])
        if failed:
            first = failed[0]
            raise OSError(
                errno.EIO,
                f"could not delete {len(failed)} object(s), first {first.get('Key')}: "
                f"{first.get('Code')} {first.get('Message')}",
                f"s3://{self.bucket}/{keys[0]}",
            )

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str, float | None]]:
        """The unfinished multipart uploads under ``prefix``: ``(key, upload id, initiated)``.
        Stores without the listing call: none."""

        async def uploads() -> builtins.list[tuple[str, str, float | None]]:
            client = await self._client()
            found: builtins.list[tuple[str, str, float | None]] = []
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            while True:
                page = await client.list_multipart_uploads(**kwargs)
                found += [(u["Key"], u["UploadId"], epoch(u.get("Initiated")))
                          for u in page.get("Uploads", [])]
                if not page.get("IsTruncated"):
                    return found
                kwargs["KeyMarker"] = page.get("NextKeyMarker")
                kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

        try:
            found: builtins.list[tuple[str, str, float | None]] = self.run(uploads())
        except Exception as e:
            status, code = _status_and_code(e)
            if code in _UNSUPPORTED_CODES or status in (405, 501):
                return []
            raise self._fail(e, prefix, "listing unfinished uploads") from e
        return found

    def abort_uploads(self, prefix: str, older_than: float) -> int:
        """Aborts the unfinished multipart uploads under ``prefix`` initiated at least
        ``older_than`` seconds ago; returns how many. Stores without the listing call: 0."""
        pending = self.list_uploads(prefix)
        cutoff = time.time() - older_than
        stale = [(k, u) for k, u, started in pending if started is None or started <= cutoff]
        futures = [
            self.submit(self.call("abort_multipart_upload", key, what="aborting an upload",
                                  UploadId=upload))
            for key, upload in stale
        ]
        aborted = 0
        for future in futures:
            try:
                future.result()
                aborted += 1
            except FileNotFoundError:
                pass  # finished or aborted meanwhile
        return aborted


class S3Writer(Writer):
    """One object: a single PUT if small, else a multipart upload with parts in flight."""

    def __init__(self, s3: S3Transport, key: str, slots: threading.BoundedSemaphore) -> None:
        self._s3, self._key, self._slots = s3, key, slots
        self._size = s3.options.part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: builtins.list[concurrent.futures.Future[Any]] = []
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
                pass  # An unfinished upload is invisible; Storage.abort_uploads (run by a
                # manager's start and `keepax gc`) or the bucket's lifecycle rules reclaim it.


class S3Reader(Reader):
    """Ranged GETs of one object; large ranges in concurrent sub-ranges."""

    def __init__(self, s3: S3Transport, key: str, size: int) -> None:
        self._s3, self._key, self._size = s3, key, size

    def read_into(self, offset: int, out: memoryview) -> int:
        return self.readv_into(offset, [out])

    def readv_into(self, offset: int, outs: builtins.list[memoryview]) -> int:
        views = [o.cast("B") if o.ndim != 1 or o.format != "B" else o for o in outs]
        total = max(0, min(sum(len(v) for v in views), self._size - offset))
        if total == 0:
            return 0
        futures = [
            self._s3.submit(self._s3.get_into(self._key, start, bufs))
            for start, bufs in _pieces(views, offset, total, self._s3.options.read_size)
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


def _pieces(
    views: builtins.list[memoryview], offset: int, total: int, step: int
) -> builtins.list[tuple[int, builtins.list[memoryview]]]:
    """Cuts the first ``total`` bytes of the destination ``views`` into pieces of at most
    ``step`` bytes: one ranged GET per piece, starting at ``offset``."""
    pieces: builtins.list[tuple[int, builtins.list[memoryview]]] = []
    current: builtins.list[memoryview] = []
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
    return pieces

