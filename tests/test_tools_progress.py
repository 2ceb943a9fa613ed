"""The tools' progress bars, run as a user runs them (``python -m keepax.cli`` in a fresh
process): a tqdm bar on a terminal, none with ``--quiet``, nothing on a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

import keepax

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
_BAR_SIGNS = ("\r", "%|", "it/s", "B/s", "leaf/s")


def _cli(args: list[str], *, terminal: bool) -> tuple[int, str, str]:
    """Runs ``keepax ARGS``; stderr on a pseudo-terminal or on a pipe. Returns (status,
    stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": _SRC, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "keepax.cli", *args]
    if not terminal:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        return run.returncode, run.stdout, run.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 cols
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO once the process closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, env=env,
                              timeout=300)
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    return proc.returncode, proc.stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(0)
    tree = {"params": {"w": rng.normal(size=(256, 256)).astype(np.float32),
                       "b": np.zeros(256, np.float32)}}
    keepax.save(str(root / "a"), tree)
    tree["params"]["b"] = tree["params"]["b"] + 1
    keepax.save(str(root / "b"), tree)
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(root / "orbax"), tree)
    return root


def _commands(root) -> dict[str, list[str]]:
    return {
        "export": ["export", str(root / "a"), str(root / "out-{mode}")],
        "import-orbax": ["import-orbax", str(root / "orbax"), str(root / "imported-{mode}")],
        "cp": ["cp", str(root / "a"), str(root / "copy-{mode}")],
        "diff": ["diff", str(root / "a"), str(root / "b")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "import-orbax", "cp", "diff"])
def test_bar_on_a_terminal_only(inputs, command):
    args = _commands(inputs)[command]
    status = 1 if command == "diff" else 0
    # On a pipe: the command's output, and not a trace of a bar.
    code, out, err = _cli([a.format(mode="pipe") for a in args], terminal=False)
    assert code == status, err
    assert not any(sign in out + err for sign in _BAR_SIGNS), (out, err)
    # On a terminal: the bar (tqdm's "| done/total" counter) ...
    code, out, err = _cli([a.format(mode="tty") for a in args], terminal=True)
    assert code == status, err
    unit = "leaf" if command == "diff" else "B"
    assert "100%|" in err and f"{unit}/s" in err, err
    # ... and none with --quiet.
    code, out, err = _cli([a.format(mode="quiet") for a in args] + ["--quiet"], terminal=True)
    assert code == status, err
    assert not any(sign in err for sign in _BAR_SIGNS), err
