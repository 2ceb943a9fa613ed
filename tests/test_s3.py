"""Scenario tests against a real S3 server (moto, on loopback): saving and restoring, the
manager, asynchronous saves, the CLI, and faults (flaky and dying servers, permanent errors).

The conformance suite of the storage interface runs on S3 too (``test_storage.py``).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Imported, not skipped: the test extras install them, and a missing one must fail.
import moto.server  # noqa: F401
import numpy as np
import pytest
import s3fs  # noqa: F401
from s3_fixtures import S3Env, endpoint_options, start_moto

import keepax
from keepax import policies
from keepax._src import checkpoint
from keepax._src.io import open_root
from keepax.cli import main as cli_main
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    NotCommittedError,
)


def _tree(seed: int = 0, big: int = 1 << 20) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": rng.standard_normal(big // 4, dtype=np.float32),
            "b": rng.standard_normal((7, 3)).astype(np.float32),
            "layers": [rng.integers(0, 100, (64, 64), dtype=np.int32) for _ in range(20)],
        },
        "step": seed,
        "name": "run",
    }


def _same(a: Any, b: Any) -> None:
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


# ---------------------------------------------------------------------------------------------
# Saving and restoring.


def test_save_restore_inspect_verify(s3: S3Env) -> None:
    tree = _tree(1, big=24 << 20)  # several data files, each several parts of 5 MiB
    url = f"{s3.url}/run/ckpt"
    options = {**s3.options, "keepax_part_size": 5 << 20}
    result = keepax.save(url, tree, metadata={"loss": 0.5}, storage_options=options)
    assert result.path == url and result.files >= 1
    keys = s3.keys("run/ckpt/")
    assert "run/ckpt/keepax.commit" in keys and "run/ckpt/manifest.json" in keys
    assert all(".keepax-" not in k for k in keys)  # written in place: no staging names
    data_files = [k for k in keys if k.startswith("run/ckpt/data/")]
    assert len(data_files) == result.files and len(data_files) <= 4  # never one per array

    stats = checkpoint.RestoreStats()
    _same(keepax.restore(url, tree, stats=stats, storage_options=options), tree)
    assert stats.bytes_read == sum(a.nbytes for a in [tree["params"]["w"], tree["params"]["b"],
                                                     *tree["params"]["layers"]])
    # Only the bytes of the selected subtree are read.
    small = checkpoint.RestoreStats()
    part = keepax.restore(url, select=["params/b"], stats=small, storage_options=options)
    np.testing.assert_array_equal(part["params"]["b"], tree["params"]["b"])
    assert small.bytes_read == tree["params"]["b"].nbytes

    info = keepax.inspect(url, storage_options=options)
    assert info.path == url and info.metadata == {"loss": 0.5}
    assert keepax.verify(url, storage_options=options) == []

    with pytest.raises(CheckpointExistsError):
        keepax.save(url, tree, storage_options=options)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        keepax.restore(f"{s3.url}/run/nope", storage_options=options)


def test_overwrite_deletes_the_old_checkpoint_marker_first(s3: S3Env) -> None:
    url = f"{s3.url}/ckpt"
    keepax.save(url, _tree(1, big=6 << 20), storage_options=s3.options)
    # As if the old checkpoint had more data files than the new one will have.
    s3.client().put_object(Bucket=s3.bucket, Key="ckpt/data/p00000-003.safetensors", Body=b"x")
    new_tree = {"x": np.arange(10)}
    keepax.save(url, new_tree, overwrite=True, storage_options=s3.options)
    _same(keepax.restore(url, storage_options=s3.options), new_tree)
    assert s3.keys("ckpt/data/") == ["ckpt/data/p00000-000.safetensors"]  # old files gone


def test_interrupted_save_is_invisible_and_saved_over(s3: S3Env) -> None:
    url = f"{s3.url}/run/7"
    tree = _tree(2)

    def crash() -> None:
        raise KeyboardInterrupt("killed before the commit")

    prepared = checkpoint.prepare_save(url, tree, storage_options=s3.options)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_prepared(prepared, before_commit=crash)
    keys = s3.keys("run/7/")
    assert "run/7/manifest.json" in keys and "run/7/keepax.commit" not in keys
    with pytest.raises(NotCommittedError, match="never finished"):
        keepax.restore(url, storage_options=s3.options)
    with keepax.CheckpointManager(f"{s3.url}/run", read_only=True,
                                  storage_options=s3.options) as manager:
        assert manager.all_steps() == []  # and no warning: it is not a step
    # Saving the same name again clears the leftovers; no overwrite needed.
    keepax.save(url, {"y": np.ones(3)}, storage_options=s3.options)
    _same(keepax.restore(url, storage_options=s3.options), {"y": np.ones(3)})
    assert not any(k.startswith("run/7/data/p00000-001") for k in s3.keys("run/7/"))


def test_manager_removes_leftovers_after_the_grace_period_only(s3: S3Env) -> None:
    root = f"{s3.url}/run"
    with keepax.CheckpointManager(root, storage_options=s3.options) as manager:
        manager.save(1, {"a": np.ones(4)})
    prepared = checkpoint.prepare_save(f"{root}/00000002", {"a": np.ones(4)},
                                     storage_options=s3.options)

    def crash() -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        checkpoint.write_prepared(prepared, before_commit=crash)
    s3.client().put_object(Bucket=s3.bucket, Key="run/notes/readme.txt", Body=b"mine")
    with pytest.warns(keepax.KeepaxWarning, match="notes"):
        manager = keepax.CheckpointManager(root, staging_grace=3600, storage_options=s3.options)
    manager.close()
    assert "run/00000002/manifest.json" in s3.keys()  # too young to be removed
    with pytest.warns(keepax.KeepaxWarning, match="notes"):
        manager = keepax.CheckpointManager(root, staging_grace=0, storage_options=s3.options)
    assert manager.all_steps() == [1]
    manager.close()
    keys = s3.keys()
    assert not any(k.startswith("run/00000002") for k in keys)
    assert "run/notes/readme.txt" in keys and "run/00000001/keepax.commit" in keys


# ---------------------------------------------------------------------------------------------
# The manager and asynchronous saves.


def test_manager_policies_retention_and_best(s3: S3Env) -> None:
    clock = [1000.0]
    root = f"{s3.url}/runs/a"
    manager = keepax.CheckpointManager(
        root,
        save_policy=policies.AnyOf(policies.EveryNSteps(10), policies.EveryInterval(60)),
        keep=[policies.KeepLast(2), policies.KeepBest(1, "loss", mode="min")],
        clock=lambda: clock[0],
        storage_options=s3.options,
    )
    losses = {0: 5.0, 10: 1.0, 20: 3.0, 30: 4.0, 40: 6.0}
    saved = []
    for step in range(0, 45):
        clock[0] += 1.0
        if step == 35:
            clock[0] += 100.0  # the interval policy saves a temporary checkpoint
        if manager.save(step, {"w": np.full(3, step, np.float32)},
                        metrics={"loss": losses.get(step, 9.0)}):
            saved.append(step)
    manager.wait_until_finished()
    assert saved == [0, 10, 20, 30, 35, 40]
    # Newest two permanents, the best (10); the temporary 35 superseded by 40.
    assert manager.all_steps() == [10, 30, 40]
    assert manager.best_step() == 10
    on_store = sorted({k.split("/")[2] for k in s3.keys("runs/a/")})
    assert on_store == ["00000010", "00000030", "00000040"]
    _same(manager.restore(30), {"w": np.full(3, 30, np.float32)})
    manager.close()

    # A new manager finds the same steps; deleting removes the files from the store.
    with keepax.CheckpointManager(root, storage_options=s3.options) as again:
        assert again.all_steps() == [10, 30, 40]
        again.delete(10)
        again.wait_until_finished()
    assert not any(k.startswith("runs/a/00000010") for k in s3.keys())


def test_async_saves(s3: S3Env) -> None:
    tree = _tree(3, big=8 << 20)
    handle = keepax.save_async(f"{s3.url}/async", tree, storage_options=s3.options)
    tree["params"]["w"][:] = 0  # the caller may mutate once staged
    record = handle.wait()
    assert record.bytes_written > 8 << 20
    restored = keepax.restore(f"{s3.url}/async", storage_options=s3.options)
    assert restored["params"]["w"].any()

    with keepax.CheckpointManager(f"{s3.url}/m", keep=[policies.KeepLast(1)],
                                  storage_options=s3.options) as manager:
        for step in range(3):
            manager.save(step, {"w": np.full(4, step)})
        manager.wait_until_finished()
        assert manager.all_steps() == [2]
    assert sorted({k.split("/")[1] for k in s3.keys("m/")}) == ["00000002"]


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_on_s3(s3: S3Env, capsys: pytest.CaptureFixture[str]) -> None:
    with keepax.CheckpointManager(f"{s3.url}/run", storage_options=s3.options) as manager:
        manager.save(5, {"w": np.ones((4, 4), np.float32)}, metrics={"loss": 0.25})
    endpoint = [f"--storage-option=client_kwargs.endpoint_url={s3.endpoint}"]
    assert cli_main(["ls", f"{s3.url}/run", *endpoint]) == 0
    out = capsys.readouterr().out
    assert "loss" in out.splitlines()[0] and "0.25" in out and "00000005" in out
    assert cli_main(["show", f"{s3.url}/run/00000005", *endpoint]) == 0
    assert "(4, 4)" in capsys.readouterr().out
    assert cli_main(["verify", "-q", f"{s3.url}/run/00000005", *endpoint]) == 0
    assert "OK" in capsys.readouterr().out

    # Damage a data object behind keepax's back: verify names it and exits 1.
    client = s3.client()
    key = "run/00000005/data/p00000-000.safetensors"
    data = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    assert cli_main(["verify", "-q", f"{s3.url}/run/00000005", *endpoint]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert cli_main(["show", f"{s3.url}/run/nope", *endpoint]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Faults: a proxy in front of the server that fails requests as told.


class _FaultProxy:
    """A loopback HTTP proxy to an S3 server; ``decide(n, method, path)`` says what to do with
    the n-th request: None (forward it), an HTTP status (answer with an S3 error instead),
    "drop" (close the connection without an answer) or "truncate" (forward it, then send
    only half of the answer's body and close the connection)."""

    def __init__(self, upstream: str, decide: Callable[[int, str, str], Any]) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.decide = decide
        self.count = 0
        self.faults = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                action = proxy.decide(n, self.command, self.path)
                if action is not None:
                    with proxy.lock:
                        proxy.faults += 1
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                truncate = action == "truncate"
                if isinstance(action, int):
                    code = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied"}[action]
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>injected</Message></Error>").encode()
                    self.send_response(action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except OSError:
                    conn.close()
                    self.close_connection = True  # the server is gone: so is the answer
                    self.connection.shutdown(2)
                    return
                conn.close()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if truncate:  # the body dies mid-stream: half of it, then the connection
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def options(self, **extra: Any) -> dict[str, Any]:
        return {**endpoint_options(self.endpoint), "keepax_retry_delay": 0.01, **extra}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_factory(s3: S3Env) -> Iterator[Callable[[Callable[[int, str, str], Any]], _FaultProxy]]:
    proxies: list[_FaultProxy] = []

    def make(decide: Callable[[int, str, str], Any]) -> _FaultProxy:
        proxies.append(_FaultProxy(s3.endpoint, decide))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_transient_errors_are_retried(s3: S3Env, proxy_factory: Any) -> None:
    kinds = [503, 500, "drop"]

    def decide(n: int, method: str, path: str) -> Any:
        return kinds[(n // 3) % 3] if n % 3 == 0 else None  # every third request fails

    proxy = proxy_factory(decide)
    options = proxy.options(keepax_part_size=5 << 20)
    tree = _tree(4, big=12 << 20)
    keepax.save(f"{s3.url}/flaky", tree, storage_options=options)
    _same(keepax.restore(f"{s3.url}/flaky", tree, storage_options=options), tree)
    with keepax.CheckpointManager(f"{s3.url}/flaky-run", keep=[policies.KeepLast(1)],
                                  storage_options=options) as manager:
        for step in range(3):
            manager.save(step, {"w": np.full(5, step)})
        manager.wait_until_finished()
        assert manager.all_steps() == [2]
    assert proxy.faults >= 10
    assert keepax.verify(f"{s3.url}/flaky", storage_options=s3.options) == []


def test_retries_are_bounded_and_nothing_is_committed(s3: S3Env, proxy_factory: Any) -> None:
    keepax.save(f"{s3.url}/run/1", {"w": np.ones(3)}, storage_options=s3.options)
    attempts: list[str] = []

    def decide(n: int, method: str, path: str) -> Any:
        if method == "PUT" and "/run/2/" in path:
            attempts.append(path)
            return 503  # the server is overloaded for good
        return None

    proxy = proxy_factory(decide)
    with pytest.raises(OSError, match=r"after 3 attempts.*SlowDown") as info:
        keepax.save(f"{s3.url}/run/2", _tree(5), storage_options=proxy.options(
            keepax_max_attempts=3))
    assert f"{s3.url}/run/2/" in str(info.value)  # names the object
    assert len(attempts) % 3 == 0 and 3 <= len(attempts) <= 12
    assert not any(k.endswith("run/2/keepax.commit") for k in s3.keys())
    _same(keepax.restore(f"{s3.url}/run/1", storage_options=s3.options), {"w": np.ones(3)})


def test_permanent_errors_fail_at_once_naming_the_url(s3: S3Env, proxy_factory: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"bucket 'no-such-bucket' does not exist"):
        keepax.save("s3://no-such-bucket/ckpt", {"w": np.ones(3)}, storage_options=s3.options)
    proxy = proxy_factory(lambda n, method, path: 403)
    with pytest.raises(PermissionError, match="access denied") as info:
        keepax.save(f"{s3.url}/denied", {"w": np.ones(3)}, storage_options=proxy.options())
    assert s3.url in str(info.value)
    assert proxy.count == 1  # not retried


def test_server_dying_mid_save_commits_nothing(s3: S3Env) -> None:
    """A second moto server (sharing the first's in-process state) is stopped while a data
    file is being uploaded; the save fails; a restarted server shows the earlier step intact
    and the new one uncommitted, and a manager removes the leftovers."""
    server, endpoint = start_moto()
    stopped = threading.Event()

    def decide(n: int, method: str, path: str) -> Any:
        if method == "PUT" and "partNumber=2" in path and not stopped.is_set():
            stopped.set()
            server.stop()  # mid-upload: part 1 is stored, part 2 never arrives
        return None

    proxy = _FaultProxy(endpoint, decide)
    try:
        options = proxy.options(keepax_part_size=5 << 20, keepax_max_attempts=2)
        root = f"{s3.url}/run"
        with keepax.CheckpointManager(root, async_save=False, storage_options=options) as mngr:
            mngr.save(1, {"w": np.ones(3)})
            with pytest.raises(OSError, match="attempts"):
                mngr.save(2, _tree(6, big=16 << 20))
            assert stopped.is_set()
    finally:
        proxy.close()
    # Back up (the session's server holds the same state).
    keys = s3.keys("run/")
    assert "run/00000001/keepax.commit" in keys and "run/00000002/keepax.commit" not in keys
    uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["run/00000002/data/p00000-000.safetensors"]
    with keepax.CheckpointManager(root, staging_grace=0, storage_options=s3.options) as mngr:
        assert mngr.all_steps() == [1]
        _same(mngr.restore(1), {"w": np.ones(3)})
        assert not any(k.startswith("run/00000002") for k in s3.keys())
        mngr.save(2, {"w": np.zeros(3)})  # going on: the dead upload is aborted
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_a_body_dying_mid_stream_is_asked_for_again(s3: S3Env, proxy_factory: Any) -> None:
    """botocore cannot retry a response whose body dies after its headers: keepax asks for
    the rest of the range again, and gives up (naming the object) when it keeps dying."""
    tree = _tree(7, big=3 << 20)
    keepax.save(f"{s3.url}/cut", tree, storage_options=s3.options)
    cut: list[str] = []

    def once(n: int, method: str, path: str) -> Any:
        if method == "GET" and "/data/" in path and not cut:
            cut.append(path)
            return "truncate"
        return None

    proxy = proxy_factory(once)
    _same(keepax.restore(f"{s3.url}/cut", tree, storage_options=proxy.options()), tree)
    assert cut and proxy.faults == 1

    always = proxy_factory(
        lambda n, method, path: "truncate" if method == "GET" and "/data/" in path else None
    )
    with pytest.raises(OSError, match="reading failed after 2 attempts") as info:
        keepax.restore(f"{s3.url}/cut", tree,
                       storage_options=always.options(keepax_max_attempts=2))
    assert f"{s3.url}/cut/data/" in str(info.value)


def test_missing_checkpoints_and_buckets_are_not_found(s3: S3Env) -> None:
    for url in (f"{s3.url}/name", f"{s3.url}/run/name", "s3://no-such-bucket/name",
                "s3://no-such-bucket/run/name"):
        with pytest.raises(CheckpointNotFoundError) as info:
            keepax.inspect(url, storage_options=s3.options)
        assert url in str(info.value)
        with pytest.raises(CheckpointNotFoundError):
            keepax.restore(url, storage_options=s3.options)
    with pytest.raises(CheckpointNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        keepax.inspect("s3://no-such-bucket/name", storage_options=s3.options)


def test_unfinished_uploads_are_aborted_after_the_grace_period(s3: S3Env) -> None:
    client = s3.client()
    dead = client.create_multipart_upload(Bucket=s3.bucket, Key="run/00000002/data/p0")
    other = client.create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/data/p0")
    storage = open_root(f"{s3.url}/run", s3.options)
    # (moto dates every upload 2010-11-10: "young" is younger than that here.)
    assert storage.abort_uploads("", older_than=10**10) == 0  # may still be in progress
    assert storage.abort_uploads("", older_than=0) == 1
    left = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]  # outside the prefix
    assert dead["UploadId"] not in [u["UploadId"] for u in left]
    assert storage.abort_uploads("") == 0


class _Stalled:
    """A TCP endpoint that accepts connections and never answers (a hung server)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read from nor written to

    def close(self) -> None:
        self.socket.close()
        for conn in self.accepted:
            conn.close()


def test_a_stalled_endpoint_fails_saying_it_stopped_answering() -> None:
    stalled = _Stalled()
    try:
        options = {**endpoint_options(stalled.endpoint), "key": "k", "secret": "s",
                   "keepax_read_timeout": 0.5,
                   "keepax_connect_timeout": 1, "keepax_max_attempts": 2}
        for call in (lambda: keepax.save("s3://bucket/ckpt", {"w": np.ones(3)},
                                         storage_options=options),
                     lambda: keepax.restore("s3://bucket/ckpt", storage_options=options)):
            with pytest.raises(TimeoutError, match="stopped answering") as info:
                call()
            message = str(info.value)
            assert stalled.endpoint in message and "keepax_read_timeout=0.5 s" in message
            assert "2 attempts" in message and "s3://bucket/ckpt" in message
        assert stalled.accepted  # it was reached, and answered nothing
    finally:
        stalled.close()


def test_timeouts_and_retries_configure_botocore(s3: S3Env) -> None:
    storage = open_root(f"{s3.url}/x", {**s3.options, "keepax_read_timeout": 7,
                                        "keepax_connect_timeout": 3, "keepax_max_attempts": 4})
    config = storage.fs.config_kwargs  # type: ignore[attr-defined]
    assert config["retries"] == {"mode": "standard", "total_max_attempts": 4}
    assert (config["connect_timeout"], config["read_timeout"]) == (3, 7)
    mine = open_root(f"{s3.url}/x", {**s3.options, "config_kwargs": {"read_timeout": 99}})
    assert mine.fs.config_kwargs["read_timeout"] == 99  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="keepax_read_timeout"):
        open_root(f"{s3.url}/x", {"keepax_read_timeout": 0})


def test_checkpoints_on_a_second_s3_implementation(s3rver: S3Env) -> None:
    """What must hold on real S3 holds on s3rver too, not only on moto: multipart saves,
    ranged restores, overwriting (marker first), not-found errors."""
    options = {**s3rver.options, "keepax_part_size": 5 << 20}
    tree = _tree(2, big=12 << 20)
    url = f"{s3rver.url}/run/ckpt"
    keepax.save(url, tree, storage_options=options)
    _same(keepax.restore(url, tree, storage_options=options), tree)
    assert keepax.verify(url, storage_options=options) == []
    with pytest.raises(CheckpointExistsError):
        keepax.save(url, tree, storage_options=options)
    keepax.save(url, {"w": np.zeros(3)}, overwrite=True, storage_options=options)
    _same(keepax.restore(url, storage_options=options), {"w": np.zeros(3)})
    info = keepax.inspect(url, storage_options=options)
    data = [k[len("run/ckpt/") :] for k in s3rver.keys("run/ckpt/data/")]
    assert data == [f for f, _ in info.files]  # the old checkpoint's files are gone
    for missing in (f"{s3rver.url}/nothing", f"{s3rver.url}/run/nothing"):
        with pytest.raises(CheckpointNotFoundError):
            keepax.inspect(missing, storage_options=options)
