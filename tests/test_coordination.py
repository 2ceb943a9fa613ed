"""Tests of keepax._src.commit.coordination: in process, against a fake runtime, and for real with
2 and 4 JAX processes (tests/mp_scripts/coordination_checks.py does the checks in each)."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest
from multiproc import SCRIPTS_DIR, run_processes

from keepax._src.commit import coordination
from keepax._src.commit.coordination import JaxCoordinator, SingleProcess
from keepax.errors import KeepaxError, PeerProcessError

# --- one process ------------------------------------------------------------------------


def test_current_is_single_process_in_one_process() -> None:
    coord = coordination.current()
    assert isinstance(coord, SingleProcess)
    assert (coord.process_index, coord.process_count) == (0, 1)


def test_single_process_collectives() -> None:
    coord = SingleProcess()
    coord.barrier("b", timeout=1)
    assert coord.broadcast("x", {"a": (1, 2)}, timeout=1) == {"a": [1, 2]}  # as JSON sends it
    assert coord.all_gather("g", 3, timeout=1) == [3]
    coord.agree("ok", None, timeout=1)
    message = r"'write' failed on process 0 of 1 \(process 0: bad\)"
    with pytest.raises(KeepaxError, match=message) as info:
        coord.agree("write", "bad", timeout=1, step=3, path="/c/3")
    assert (info.value.step, info.value.path) == (3, "/c/3")
    assert "step 3" in str(info.value) and "/c/3" in str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.barrier("", timeout=1),
        lambda c: c.barrier("a/b", timeout=1),
        lambda c: c.barrier("b", timeout=0),
        lambda c: c.barrier("b", timeout=float("inf")),
        lambda c: c.broadcast("b", 1, timeout=1, source=1),
    ],
)
def test_single_process_rejects_bad_arguments(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call(SingleProcess())


def test_single_process_rejects_non_json() -> None:
    with pytest.raises(TypeError):
        SingleProcess().all_gather("g", object(), timeout=1)
    with pytest.raises(TypeError):
        SingleProcess().agree("a", 1, timeout=1)  # type: ignore[arg-type]


# --- the runtime coordinator against a fake key-value store -------------------------------


class FakeClient:
    """The runtime client's key-value calls over a dict; the barrier is passed or failed."""

    def __init__(self, barrier_error: str | None = None, set_error: str | None = None) -> None:
        self.store: dict[str, str] = {}
        self.barriers: list[str] = []
        self.barrier_error = barrier_error
        self.set_error = set_error

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if self.set_error:
            raise RuntimeError(self.set_error)
        if key in self.store and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
        self.store[key] = value

    def wait_at_barrier(self, barrier_id: str, timeout_in_ms: int) -> None:
        self.barriers.append(barrier_id)
        if self.barrier_error:
            raise RuntimeError(self.barrier_error)

    def key_value_try_get(self, key: str) -> str:
        return self.store[key]

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in self.store.items() if k.startswith(key))

    def key_value_delete(self, key: str) -> None:
        for k in [k for k in self.store if k == key or k.startswith(key + "/")]:
            del self.store[k]


def test_runtime_coordinator_keys_are_unique_and_bounded() -> None:
    client = FakeClient()
    coord = JaxCoordinator(client, 0, 1, namespace="ns")
    coord.barrier("b", timeout=1)
    assert coord.broadcast("x", [1, "a"], timeout=1) == [1, "a"]
    for k in range(10):
        assert coord.all_gather("g", k, timeout=1) == [k]
    assert client.barriers[:3] == ["ns/0/b", "ns/1/x", "ns/2/g"]
    assert len(set(client.barriers)) == len(client.barriers)
    assert client.store == {"ns/11/g/0": "9"}  # only the last call's keys are left


def test_runtime_coordinator_timeout_names_missing_processes() -> None:
    client = FakeClient(barrier_error=(
        "DEADLINE_EXCEEDED: Barrier timed out. Id: x. This usually happens because a task..."
    ))
    coord = JaxCoordinator(client, 0, 4)
    message = "processes 1, 2, 3 of 4 did not reach 'commit' within 2 s (DEADLINE_EXCEEDED"
    with pytest.raises(KeepaxError, match=re.escape(message)) as info:
        coord.barrier("commit", timeout=2, step=7, path="/c/7")
    assert (info.value.step, info.value.path) == (7, "/c/7")
    assert "This usually" not in str(info.value)  # the runtime's generic advice is cut


def test_runtime_coordinator_wraps_runtime_errors() -> None:
    coord = JaxCoordinator(FakeClient(set_error="UNAVAILABLE: socket closed"), 1, 2)
    with pytest.raises(KeepaxError, match=r"'g' failed to publish on process 1 of 2 \(UNAVAILABLE"):
        coord.all_gather("g", 1, timeout=1, step=2)


# --- real processes ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_across_processes(tmp_path: Path, n: int) -> None:
    script = SCRIPTS_DIR / "coordination_checks.py"
    results = run_processes(script, n, tmp_path=tmp_path, timeout=60)
    for r in results:
        report = r.result
        context = r.describe()
        assert report is not None, context
        assert "'write' failed on process 1 of" in report["agree_error"], context
        assert "OSError: disk full" in report["agree_error"], context
        assert f"processes {n - 2}, {n - 1} of {n}" in report["agree_error2"], context
        assert report["max_keys"] <= 3 * n, context
        if r.index == 1:  # the late comer
            assert "'commit' timed out on process 1" in report["timeout_error"], context
        else:
            expected = f"process 1 of {n} did not reach 'commit' within 1 s"
            assert expected in report["timeout_error"], context
            assert 0.9 < report["timeout_elapsed"] < 3.4, context


def test_harness_shows_a_failed_child(tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent(
            """
            import mp_prelude
            import time
            if mp_prelude.INDEX == 1:
                raise ValueError("boom-marker")
            mp_prelude.report({"waiting": True})
            time.sleep(60)  # a peer left hanging: the harness kills it
            """
        )
    )
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_processes(script, 2, tmp_path=tmp_path, timeout=30)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "processes [0, 1] failed" in message
    assert "ValueError: boom-marker" in message
    assert "process 0 (pid" in message and "TIMED OUT" in message
    results = run_processes(script, 2, tmp_path=tmp_path, timeout=0.5, check=False)
    assert results[0].timed_out and results[0].result == {"waiting": True}


class _LookupFails(FakeClient):
    """Process 0 (and the store it hosts) is gone: the lookup after a failed barrier fails."""

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")


def test_a_failed_lookup_never_claims_that_every_process_arrived() -> None:
    coord = JaxCoordinator(_LookupFails(barrier_error="DEADLINE_EXCEEDED: Barrier timed out"),
                           1, 2)
    with pytest.raises(KeepaxError) as info:
        coord.barrier("commit", timeout=2, step=3)
    text = str(info.value)
    assert "could not be looked up (UNAVAILABLE" in text and "has arrived" not in text


def test_a_barrier_error_tells_a_death_from_a_timeout() -> None:
    coord = JaxCoordinator(FakeClient(barrier_error=(
        "UNAVAILABLE: task 2 stopped sending heartbeats")), 0, 4)
    with pytest.raises(PeerProcessError) as info:
        coord.barrier("commit", timeout=600)
    text = str(info.value)
    assert "processes 1, 2, 3 of 4 did not reach 'commit': the runtime lost" in text
    assert "within 600 s" not in text and info.value.processes == (1, 2, 3)
