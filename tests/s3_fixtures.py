"""A real S3 server (moto) on loopback, for the object storage tests.

Loaded as a pytest plugin by ``conftest.py``. One server runs for the whole session; each test
that asks for ``s3`` gets it reset (every bucket gone) and a fresh, empty bucket.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclasses.dataclass(frozen=True)
class S3Env:
    """One test's bucket on the moto server.

    Attributes:
      endpoint: The server's URL (``http://127.0.0.1:PORT``).
      bucket: A fresh bucket.
      url: ``s3://<bucket>``.
      options: ``storage_options`` pointing s3fs at the server.
    """

    endpoint: str
    bucket: str
    url: str
    options: dict[str, Any]

    def client(self) -> Any:
        """A boto3 client of the server (to look at or damage objects directly)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.options.get("key"),
            aws_secret_access_key=self.options.get("secret"),
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def start_moto() -> tuple[Any, str]:
    """Starts a moto S3 server on a free loopback port; returns it and its endpoint."""
    from moto.server import ThreadedMotoServer

    for key, value in _ENV.items():
        os.environ[key] = value
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def endpoint_options(endpoint: str) -> dict[str, Any]:
    """``storage_options`` for s3fs to talk to ``endpoint`` (its own client instance)."""
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The session's moto server."""
    # Imported, not skipped: the test extras install them, and a missing one must fail.
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401
    saved = {key: os.environ.get(key) for key in _ENV}
    server, endpoint = start_moto()
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(moto_endpoint: str) -> Iterator[S3Env]:
    """A fresh bucket on a freshly reset moto server."""
    import s3fs

    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    s3fs.S3FileSystem.clear_instance_cache()
    env = S3Env(
        endpoint=moto_endpoint,
        bucket=f"keepax-{uuid.uuid4().hex[:12]}",
        url="",
        options={"client_kwargs": {"endpoint_url": moto_endpoint}},
    )
    env = dataclasses.replace(env, url=f"s3://{env.bucket}")
    env.client().create_bucket(Bucket=env.bucket)
    yield env
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3rver_endpoint() -> Iterator[str]:
    """A second, independent S3 implementation: s3rver (npm), on loopback.

    moto is the S3 server of most tests; the conformance suite also runs against s3rver, so
    that what must hold on real S3 is not only what moto does. s3rver is a Node package
    (``npm install -g s3rver``), outside the Python extras: where it is not installed the
    tests that ask for it are skipped, saying so, unless ``KEEPAX_REQUIRE_S3RVER=1`` makes a
    missing one fail (as it should in CI that installs it).
    """
    binary = shutil.which("s3rver")
    if binary is None:
        if os.environ.get("KEEPAX_REQUIRE_S3RVER"):
            pytest.fail("s3rver is not installed (npm install -g s3rver)")
        pytest.skip("s3rver is not installed (npm install -g s3rver); "
                    "KEEPAX_REQUIRE_S3RVER=1 makes this a failure")
    with socket.socket() as probe:  # a free port (s3rver's own "-p 0" is only printed)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [binary, "-d", directory, "-a", "127.0.0.1", "-p", str(port), "--silent",
             "--no-vhost-buckets"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):  # until it listens (or exits)
                if process.poll() is not None:
                    raise RuntimeError(f"s3rver exited with status {process.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture
def s3rver(s3rver_endpoint: str) -> Iterator[S3Env]:
    """A fresh bucket on the session's s3rver."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"keepax-{uuid.uuid4().hex[:12]}"
    env = S3Env(endpoint=s3rver_endpoint, bucket=bucket, url=f"s3://{bucket}",
                options={"client_kwargs": {"endpoint_url": s3rver_endpoint},
                         "key": "S3RVER", "secret": "S3RVER"})  # s3rver's one account
    env.client().create_bucket(Bucket=bucket)
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
