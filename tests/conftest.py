"""Test configuration: JAX runs strictly, on 8 virtual CPU devices."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)

from keepax._src.io import memory  # noqa: E402


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # noqa: ANN001
    """A directory URL to save checkpoints under, on each storage backend."""
    if request.param == "local":
        yield str(tmp_path)
        return
    name = f"test-{os.getpid()}-{id(request)}"
    yield f"memory://{name}"
    memory.clear(name)

@pytest.fixture
def directory(root: str) -> str:
    """A manager directory (not yet created) on each storage backend."""
    return f"{root}/run"


pytest_plugins = ["s3_fixtures"]


@pytest.fixture
def digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the chunks hashed whole (``digests.digest``; the real function runs), by size."""
    from keepax._src.format import digests

    calls: list[int] = []
    real = digests.digest

    def counting(array: Any) -> str:
        calls.append(array.nbytes)
        return real(array)

    monkeypatch.setattr(digests, "digest", counting)
    return calls
