"""Kill a training run and resume it: the result is bit-for-bit the same (`make demo`).

1. Trains `examples/train.py` without interruption, as the reference.
2. Starts the same run again in another directory, sends it SIGTERM part-way, and checks it
   saved a checkpoint at the step where it stopped and exited cleanly.
3. Starts it again: it resumes from that checkpoint and runs to the end.
4. Compares the final parameters of both runs, bit for bit (exit status 1 if they differ).
5. Shows the checkpoints kept (`keepax ls`), then the latest one (`keepax show`, `keepax verify`).

Everything goes to `demo_out/` (wiped first).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

import keepax

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "demo_out")
TRAIN = [sys.executable, "-u", "examples/train.py"]
KEEPAX = [sys.executable, "-m", "keepax"]
STEPS, SEED = 300, 0
DELAY = 0.01  # seconds of sleep per step in the run we kill, so the kill lands mid-run
KILL_AFTER = 100  # send SIGTERM once a checkpoint of this step or later is committed
ENV = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def heading(text: str) -> None:
    print(f"\n=== {text}\n", flush=True)


def fail(message: str) -> None:
    print(f"\nFAILED: {message}", flush=True)
    sys.exit(1)


def show_log(path: str) -> str:
    with open(path) as f:
        text = f.read()
    print("".join(f"    {line}" for line in text.splitlines(keepends=True)), end="", flush=True)
    return text


def train(run_dir: str, *extra: str, log: str) -> subprocess.Popen[bytes]:
    """Starts train.py with its output going to `log`."""
    args = ["--dir", run_dir, "--steps", str(STEPS), "--seed", str(SEED), *extra]
    print("$ python examples/train.py " + " ".join(args), flush=True)
    with open(log, "w") as f:
        return subprocess.Popen([*TRAIN, *args], stdout=f, stderr=subprocess.STDOUT, env=ENV)


def latest_step(run_dir: str) -> int | None:
    """The latest committed step, read as another process would (no lock taken)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step being deleted right now is skipped: fine
        try:
            with keepax.CheckpointManager(run_dir, read_only=True) as mngr:
                return mngr.latest_step()
        except keepax.errors.CheckpointNotFoundError:  # the directory is not there yet
            return None


def cli(*args: str) -> None:
    print("$ keepax " + " ".join(args), flush=True)
    subprocess.run([*KEEPAX, *args], check=True, env=ENV)
    print(flush=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    os.chdir(ROOT)  # paths below are relative to the repository root, as the output shows
    ref_dir, run_dir = "demo_out/reference", "demo_out/resumed"
    ref_final, run_final = "demo_out/reference.keepax", "demo_out/resumed.keepax"

    heading(f"1. The reference run: {STEPS} steps, never interrupted")
    proc = train(ref_dir, "--final", ref_final, log="demo_out/reference.log")
    proc.wait()
    show_log("demo_out/reference.log")
    if proc.returncode != 0:
        fail(f"the reference run exited with status {proc.returncode}")

    heading(f"2. The same run, sent SIGTERM once step {KILL_AFTER} is saved")
    log = "demo_out/preempted.log"
    proc = train(run_dir, "--final", run_final, "--step-delay", str(DELAY), log=log)
    while proc.poll() is None and (latest_step(run_dir) or -1) < KILL_AFTER:
        time.sleep(0.02)
    if proc.poll() is not None:
        show_log(log)
        fail("the run ended before it could be interrupted")
    sent_at = latest_step(run_dir)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    text = show_log(log)
    stopped = latest_step(run_dir)
    if proc.returncode != 0:
        fail(f"the interrupted run exited with status {proc.returncode}, not 0")
    if f"preempted: saved step {stopped}," not in text or stopped >= STEPS - 1:
        fail(f"the interrupted run did not save at its preemption step (latest is {stopped})")
    if os.path.exists(run_final):
        fail("the interrupted run wrote final params although it had not finished")
    print(f"\nSIGTERM arrived after step {sent_at} was committed. The next save saved whatever "
          f"the policy said\n(step {stopped}), and the run exited with status 0. It holds:\n")
    cli("ls", run_dir)

    heading("3. Start it again: it resumes from the last checkpoint")
    proc = train(run_dir, "--final", run_final, log="demo_out/resumed.log")
    proc.wait()
    text = show_log("demo_out/resumed.log")
    if proc.returncode != 0 or f"resumed from step {stopped}" not in text:
        fail(f"the resumed run did not resume from step {stopped} (status {proc.returncode})")

    heading("4. Compare the final parameters of both runs")
    ref, res = keepax.load_file(ref_final), keepax.load_file(run_final)
    ref_leaves, res_leaves = flat(ref), flat(res)
    if ref_leaves.keys() != res_leaves.keys():
        fail(f"different parameter trees: {sorted(ref_leaves)} vs {sorted(res_leaves)}")
    for name, a in ref_leaves.items():
        b = res_leaves[name]
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        print(f"  {name:6s} {str(a.dtype):8s} {str(a.shape):10s} "
              + ("identical" if same else f"DIFFERENT (max |diff| {np.max(np.abs(a - b)):.3g})"))
        if not same:
            fail("the resumed run's final params differ from the uninterrupted run's")
    print("\nresumed run matches the uninterrupted run bit for bit", flush=True)

    heading("5. The checkpoints kept (last 2 + best 2 by eval loss), and the latest one")
    cli("ls", run_dir)
    with keepax.CheckpointManager(run_dir, read_only=True) as mngr:
        latest = mngr.metadata(mngr.latest_step()).path
    cli("show", latest)
    cli("verify", "--quiet", latest)


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"l1/w": array, ...} from nested dicts of arrays."""
    out = {}
    for key, value in sorted(tree.items()):
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


if __name__ == "__main__":
    main()
