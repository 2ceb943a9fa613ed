"""``keepax.save_file`` killed (``kill -9``) at random instants: the file at the path is always
the old one or the new one, whole, and the next ``save_file`` leaves no temporary behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import keepax

# Saves versions 1, 2, 3, ... of a state to one path, overwriting, and prints each version
# once it is saved.
_CHILD = """
import sys
import numpy as np
import keepax

path = sys.argv[1]
version = int(sys.argv[2])
while True:
    version += 1
    state = {"version": version, "x": np.full(2 << 20, version, np.float32)}
    keepax.save_file(path, state, metadata={"version": version}, overwrite=True)
    print(version, flush=True)
"""

TRIALS = 8


def _temporaries(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".keepax-tmp-" in n)


def _check_whole(path: Path, allowed: set[int]) -> int:
    """Loads the file (every chunk's CRC checked) and returns its version."""
    state, metadata = keepax.load_file(path, with_metadata=True)
    version = state["version"]
    assert version in allowed, (version, allowed)
    assert metadata == {"version": version}
    assert state["x"].shape == (2 << 20,) and np.all(state["x"] == version)
    return version


@pytest.mark.timeout(600)
def test_save_file_killed_at_random_instants(tmp_path: Path) -> None:
    rng = random.Random(20240514)
    path = tmp_path / "fit.keepax"
    keepax.save_file(path, {"version": 0, "x": np.zeros(2 << 20, np.float32)},
                     metadata={"version": 0})
    saved = 0  # the newest version known to be saved
    left_behind = 0
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for _ in range(TRIALS):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(saved)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()  # one save finished: later ones are in flight
            assert line, child.stderr.read() if child.stderr else "child died"
            saved = int(line)
            time.sleep(rng.uniform(0.0, 0.25))  # a random instant in the next saves
        finally:
            os.kill(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        printed = [int(v) for v in out.split()]
        newest_printed = max([saved, *printed])
        # The old file (the last save that finished) or the one being written, whole.
        saved = _check_whole(path, {newest_printed, newest_printed + 1})
        left_behind += bool(_temporaries(tmp_path))
        # The next save removes the temporary a killed save left.
        keepax.save_file(path, {"version": saved, "x": np.full(2 << 20, saved, np.float32)},
                         metadata={"version": saved}, overwrite=True)
        assert _temporaries(tmp_path) == []
        assert _check_whole(path, {saved}) == saved
    print(f"{left_behind} of {TRIALS} kills left a temporary (removed by the next save)")
