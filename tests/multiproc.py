"""Runs a script as several real JAX processes on this machine (one per simulated host).

Each child runs ``sys.executable script *args`` with its stdout and stderr in a file under the
test's ``tmp_path`` (never a pipe, which would block a chatty child), and with the environment
``tests/mp_prelude.py`` reads: coordinator port (a free port on 127.0.0.1), process count and
index, devices per process, and a results directory. ``PYTHONPATH`` holds ``tests/`` and
``src/``, so a child imports ``mp_prelude``, ``multiproc`` and the working tree's ``keepax``.

Usage from a test::

    from multiproc import run_processes

    def test_something(tmp_path):
        results = run_processes(SCRIPTS / "checks.py", 2, tmp_path=tmp_path)  # asserts success
        assert results[0].result == {...}                                      # from report()

``start_processes`` returns a :class:`ProcessGroup` for tests that kill processes. Only the
PIDs of children started here are ever signalled. A child that overruns its time limit first
gets ``SIGUSR1`` (``mp_prelude`` dumps every thread's stack) and then ``SIGKILL``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"
SCRIPTS_DIR = TESTS_DIR / "mp_scripts"

_TAIL_CHARS = 4000
_FAILURE_GRACE_S = 3.0
"""After a child fails on its own, how long its peers may go on before they are killed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class ProcessResult:
    """How one child ended.

    Attributes:
      index: The child's process index.
      returncode: Its exit status (negative: killed by that signal).
      output: Its stdout and stderr, interleaved.
      pid: Its process ID.
      timed_out: Whether the harness killed it for overrunning the time limit.
      killed: Whether the test killed it (``ProcessGroup.kill``).
      result: The JSON value it passed to ``mp_prelude.report``, or ``None``.
    """

    index: int
    returncode: int
    output: str
    pid: int
    timed_out: bool = False
    killed: bool = False
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self, tail: int = _TAIL_CHARS) -> str:
        """A header line and the tail of the output, for assertion messages."""
        state = "TIMED OUT (killed)" if self.timed_out else f"exit status {self.returncode}"
        if self.killed:
            state += " (killed by the test)"
        text = self.output if len(self.output) <= tail else "..." + self.output[-tail:]
        return f"--- process {self.index} (pid {self.pid}): {state} ---\n{text.rstrip()}"


def describe_all(results: Sequence[ProcessResult]) -> str:
    """Every child's state and output tail, in index order."""
    return "\n".join(r.describe() for r in results)


def check_ok(results: Sequence[ProcessResult]) -> list[ProcessResult]:
    """Raises ``AssertionError`` showing every child's output unless all exited 0."""
    bad = [r.index for r in results if not r.ok]
    if bad:
        raise AssertionError(f"processes {bad} failed\n{describe_all(results)}")
    return list(results)


class ProcessGroup:
    """The children of one ``start_processes`` call. A context manager: leaving it kills
    whatever children are still running."""

    def __init__(
        self, popens: list[subprocess.Popen[bytes]], logs: list[Path], results_dir: Path
    ) -> None:
        self._popens = popens
        self._logs = logs
        self._results_dir = results_dir
        self._killed: set[int] = set()
        self._timed_out: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._popens]

    @property
    def log_paths(self) -> list[Path]:
        return list(self._logs)

    def output(self, index: int) -> str:
        """What child ``index`` has written so far."""
        return self._logs[index].read_text(errors="replace")

    def poll(self, index: int) -> int | None:
        return self._popens[index].poll()

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to child ``index`` (if it is still running)."""
        popen = self._popens[index]
        if popen.poll() is None:
            if sig == signal.SIGKILL:
                self._killed.add(index)
            popen.send_signal(sig)

    def wait_for_output(self, index: int, text: str, timeout: float) -> None:
        """Waits until child ``index`` has printed ``text``; raises ``AssertionError`` if it
        exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while text not in self.output(index):
            if self._popens[index].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"process {index} never printed {text!r}\n{self._result(index).describe()}"
                )
            time.sleep(0.02)

    def wait(
        self, timeout: float, *, failure_grace: float | None = _FAILURE_GRACE_S
    ) -> list[ProcessResult]:
        """Waits for every child and returns how each ended; never raises.

        Args:
          timeout: Seconds after which the children still running are killed (as timed out).
          failure_grace: Once a child has failed on its own (nonzero status, not killed by
            ``kill``), its peers, which would otherwise hang until the runtime's heartbeat
            timeout, are killed this many seconds later; ``None``: wait the full ``timeout``.
        """
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while True:
            now = time.monotonic()
            running = [i for i, p in enumerate(self._popens) if p.poll() is None]
            if not running:
                break
            if failure_grace is not None and failed_at is None and any(
                p.returncode not in (None, 0) and i not in self._killed
                for i, p in enumerate(self._popens)
            ):
                failed_at = now
            grace_over = failed_at is not None and now > failed_at + (failure_grace or 0.0)
            if now > deadline or grace_over:
                self._terminate(running)
                break
            time.sleep(0.02)
        return [self._result(i) for i in range(len(self._popens))]

    def _terminate(self, indices: Sequence[int]) -> None:
        for i in indices:
            self._timed_out.add(i)
            try:
                self._popens[i].send_signal(signal.SIGUSR1)  # mp_prelude dumps the stacks
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        for i in indices:
            if self._popens[i].poll() is None:
                self._popens[i].kill()
            self._popens[i].wait()

    def _result(self, index: int) -> ProcessResult:
        popen = self._popens[index]
        result_file = self._results_dir / f"result-{index}.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        return ProcessResult(
            index=index,
            returncode=popen.returncode if popen.returncode is not None else -999,
            output=self.output(index),
            pid=popen.pid,
            timed_out=index in self._timed_out,
            killed=index in self._killed,
            result=result,
        )

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        running = [i for i, p in enumerate(self._popens) if p.poll() is None]
        for i in running:
            self._popens[i].kill()
        for i in running:
            self._popens[i].wait()


def start_processes(
    script: str | Path,
    n: int,
    *,
    tmp_path: Path,
    args: Sequence[str] = (),
    devices_per_process: int = 2,
    env: Mapping[str, str] | None = None,
) -> ProcessGroup:
    """Starts ``n`` children running ``script``; see the module docstring.

    Args:
      script: The child script (it imports ``mp_prelude`` first).
      n: How many processes.
      tmp_path: Where a fresh ``mp-*`` directory holds the output files and results.
      args: Command-line arguments, the same for every child.
      devices_per_process: CPU devices each child gets.
      env: Extra environment variables.

    Returns:
      The group of children; use it as a context manager.
    """
    workdir = Path(tempfile.mkdtemp(prefix="mp-", dir=tmp_path))
    results_dir = workdir / "results"
    results_dir.mkdir()
    port = free_port()
    base = dict(os.environ)
    base.pop("XLA_FLAGS", None)  # the parent's (8 devices) must not leak into the children
    base.pop("JAX_PLATFORMS", None)
    base.update(env or {})
    pythonpath = [str(TESTS_DIR), str(SRC_DIR)]
    if base.get("PYTHONPATH"):
        pythonpath.append(base["PYTHONPATH"])
    base.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        PYTHONUNBUFFERED="1",
        KEEPAX_MP_PORT=str(port),
        KEEPAX_MP_COUNT=str(n),
        KEEPAX_MP_DEVICES=str(devices_per_process),
        KEEPAX_MP_RESULTS=str(results_dir),
    )
    popens: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i in range(n):
            log = workdir / f"process-{i}.log"
            logs.append(log)
            with open(log, "wb") as out:
                popens.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(script).resolve()), *args],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**base, "KEEPAX_MP_INDEX": str(i)},
                        cwd=workdir,
                    )
                )
    except BaseException:
        for p in popens:
            p.kill()
            p.wait()
        raise
    return ProcessGroup(popens, logs, results_dir)


def run_processes(
    script: str | Path,
    n: int,
    *,
    tmp_path: Path,
    args: Sequence[str] = (),
    timeout: float = 60,
    devices_per_process: int = 2,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> list[ProcessResult]:
    """Runs ``n`` children of ``script`` to the end (see ``start_processes``).

    Args:
      timeout: Seconds before the children still running are killed.
      check: Raise ``AssertionError`` with every child's output tail unless all exit 0.

    Returns:
      One result per child, by index.
    """
    with start_processes(
        script, n, tmp_path=tmp_path, args=args,
        devices_per_process=devices_per_process, env=env,
    ) as group:
        results = group.wait(timeout)
    return check_ok(results) if check else results
