"""Crash safety under a real ``kill -9``.

A child process saves checkpoints ``ckpt_<i>`` of a ~40 MB tree in a loop, and after each one
overwrites the checkpoint ``live`` with the same contents. The parent SIGKILLs it at random
moments. After every kill, everything visible must be either a complete checkpoint holding
exactly what was saved under that name, or keepax's own hidden staging/trash entry; ``live``,
once committed, must always exist and hold one complete version.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

import keepax
from keepax.errors import CheckpointNotFoundError, NotCommittedError

# The tree a checkpoint of index i holds. Shared verbatim by the child and the parent.
TREE_SOURCE = textwrap.dedent(
    """
    import numpy as np

    def make_tree(i):
        return {
            "w": np.arange(5_000_000, dtype=np.float32) + np.float32(i % 1000),  # 20 MB
            "v": np.full((2000, 2500), i, dtype=np.int32),  # 20 MB
            "small": {
                "x": np.arange(16, dtype=np.int64) * i,
                "k": np.uint8(i % 251),
                "list": [np.float64(i) / 7, b"bytes-%d" % i],
            },
            "step": i,
            "tag": "v%d" % i,
        }
    """
)

CHILD_SOURCE = TREE_SOURCE + textwrap.dedent(
    """
    import os
    import sys

    import jax
    import keepax

    root, first = sys.argv[1], int(sys.argv[2])
    jax.process_index()  # initialise the backend before the parent starts its clock
    print("ready", flush=True)
    i = first
    while True:
        keepax.save(os.path.join(root, "ckpt_%d" % i), make_tree(i))
        keepax.save(os.path.join(root, "live"), make_tree(i), overwrite=True)
        i += 1
    """
)

_namespace: dict[str, Any] = {}
exec(TREE_SOURCE, _namespace)  # noqa: S102 - our own constant source
make_tree = _namespace["make_tree"]

ITERATIONS = 16  # kills after a random 0-0.5 s; one more after LAST_DELAY guarantees progress
LAST_DELAY = 1.5
INDICES_PER_CHILD = 1000  # child k saves indices k*1000, k*1000+1, ...


def assert_bit_exact(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            assert_bit_exact(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        for n, (g, w) in enumerate(zip(got, want)):
            assert_bit_exact(g, w, f"{where}[{n}]")
    elif isinstance(want, np.ndarray | np.generic):
        got_a, want_a = np.asarray(got), np.asarray(want)
        assert got_a.dtype == want_a.dtype and got_a.shape == want_a.shape, where
        assert got_a.tobytes() == want_a.tobytes(), f"{where}: wrong bytes"
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def _start_child(script: str, root: str, first: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, script, root, str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child did not start: {line!r} {err.decode(errors='replace')[-2000:]}")
    return proc


@pytest.mark.slow
def test_kill_9_never_leaves_wrong_or_partial_checkpoints(tmp_path):
    rng = random.Random(20240917)
    script = str(tmp_path / "child.py")
    with open(script, "w") as f:
        f.write(CHILD_SOURCE)
    root = tmp_path / "ckpts"
    root.mkdir()

    live_step = None  # the version `live` held after the previous kill
    committed_total = 0
    hidden_total = 0
    began = time.monotonic()
    for iteration in range(ITERATIONS + 1):
        first = iteration * INDICES_PER_CHILD
        proc = _start_child(script, str(root), first)
        time.sleep(rng.uniform(0.0, 0.5) if iteration < ITERATIONS else LAST_DELAY)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL

        committed = set()
        for name in sorted(os.listdir(root)):
            full = str(root / name)
            if ".keepax-" in name:
                # Staging or trash: never a user-visible name; removed by us below.
                hidden_total += 1
                assert name.startswith(("ckpt_", "live.")), name
                continue
            try:
                got = keepax.restore(full)
            except (NotCommittedError, CheckpointNotFoundError) as e:
                # Commit is a rename of a complete directory, so a visible name is never
                # incomplete; the brief allows these, but keepax's contract is stronger.
                pytest.fail(f"visible but not a complete checkpoint after kill -9: {name}: {e}")
            if name == "live":
                step = got["step"]
                assert isinstance(step, int)
                assert first <= step < first + INDICES_PER_CHILD or (
                    step == live_step
                ), f"live holds version {step}, not one saved so far"
                if live_step is not None:
                    assert step >= live_step, "live went back in time"
                assert_bit_exact(got, make_tree(step), f"live (version {step})")
                live_step = step
            else:
                assert name.startswith("ckpt_"), name
                index = int(name[len("ckpt_") :])
                assert first <= index < first + INDICES_PER_CHILD
                assert_bit_exact(got, make_tree(index), name)
                committed.add(index)
        committed_total += len(committed)

        # The child saves ckpt_i, then live with the same contents, in order.
        if committed:
            assert committed == set(range(first, max(committed) + 1)), sorted(committed)
            if max(committed) > first:  # live(i) was committed before ckpt_<i+1> started
                assert live_step is not None and live_step >= max(committed) - 1
        if live_step is not None:
            assert os.path.isdir(root / "live"), "live vanished after its first commit"
            if live_step >= first:
                assert live_step in committed  # ckpt_<step> was committed before live was

        # Keep the disk small: drop everything but `live` before the next child.
        for name in os.listdir(root):
            if name != "live":
                shutil.rmtree(root / name)

    elapsed = time.monotonic() - began
    # The test must have exercised something: checkpoints were committed across kills.
    assert committed_total > 0, "no checkpoint was ever committed; kills came too early"
    assert live_step is not None
    assert keepax.verify(str(root / "live")) == []
    print(f"{ITERATIONS + 1} kills, {committed_total} committed, {hidden_total} hidden leftovers, "
          f"{elapsed:.1f}s")
