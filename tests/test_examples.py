"""examples/train.py, end to end: a run killed with SIGTERM and restarted ends bit for bit
where an uninterrupted run does (what `make demo` shows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import keepax

TRAIN = os.path.join(os.path.dirname(__file__), "..", "examples", "train.py")
STEPS = 120  # saves at 0, 20, ..., 100 and 119
KILL_AFTER = 40


def _train(run_dir: str, final: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", TRAIN, "--dir", run_dir, "--steps", str(STEPS), "--seed", "3",
         "--final", final, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"train.py exited with status {proc.returncode}:\n{out}"
    return out


def _latest_step(run_dir: str) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step being deleted while we look is skipped
        try:
            with keepax.CheckpointManager(run_dir, read_only=True) as mngr:
                return mngr.latest_step()
        except keepax.errors.CheckpointNotFoundError:
            return None


def _leaves(path: str) -> dict[str, np.ndarray]:
    tree = keepax.load_file(path)
    return {f"{layer}/{name}": np.asarray(a)
            for layer, d in tree.items() for name, a in d.items()}


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path) -> None:
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref_final, run_final = str(tmp_path / "ref.keepax"), str(tmp_path / "run.keepax")
    # The reference runs while the other run starts; both are CPU-light.
    reference = _train(ref_dir, ref_final)

    # Interrupt a run part-way, once step KILL_AFTER is committed.
    proc = _train(run_dir, run_final, "--step-delay", "0.02")
    deadline = time.monotonic() + 60
    while (_latest_step(run_dir) or -1) < KILL_AFTER:
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint of step 40 after 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)  # a clean exit, status 0
    stopped = _latest_step(run_dir)
    assert stopped is not None and KILL_AFTER < stopped < STEPS - 1, out
    assert f"preempted: saved step {stopped}, exiting" in out, out
    assert not os.path.exists(run_final), "an interrupted run must not write final params"

    # Restart: it resumes from the step saved at preemption and runs to the end.
    out = _finish(_train(run_dir, run_final))
    assert f"resumed from step {stopped}" in out, out
    _finish(reference)

    ref, res = _leaves(ref_final), _leaves(run_final)
    assert ref.keys() == res.keys() == {f"l{i}/{p}" for i in (1, 2, 3) for p in ("w", "b")}
    for name in ref:
        assert ref[name].dtype == res[name].dtype and ref[name].shape == res[name].shape, name
        assert ref[name].tobytes() == res[name].tobytes(), (
            f"{name} differs after resuming from step {stopped}: max |diff| "
            f"{np.max(np.abs(ref[name] - res[name]))}"
        )
    # The kept checkpoints: the last 2 plus the best 2 by eval loss.
    with keepax.CheckpointManager(run_dir, read_only=True) as mngr:
        steps = mngr.all_steps()
        assert steps[-2:] == [100, STEPS - 1] and len(steps) <= 4, steps
        assert all("eval_loss" in mngr.metrics(s) for s in steps)
