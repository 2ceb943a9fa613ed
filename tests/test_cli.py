"""The command line: show and verify, as a console script and as python -m keepax."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import keepax
from keepax.cli import main


@pytest.fixture
def ckpt(tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    keepax.save(
        path,
        {"params": {"w": np.ones((64, 32), np.float32), "b": np.zeros(32)}, "step": 7, "tag": "x"},
        metadata={"loss": 0.25},
    )
    return path


def test_show_lists_leaves_shapes_dtypes_sizes_and_totals(ckpt: str, capsys) -> None:
    assert main(["show", ckpt]) == 0
    out = capsys.readouterr().out
    assert "['params']['w']" in out and "(64, 32)" in out and "float32" in out
    assert "8.0 KiB" in out and "float64" in out
    assert "['step']" in out and "7" in out
    assert '{"loss": 0.25}' in out
    assert "4 leaves (2 arrays)" in out and "1 data file" in out


def test_verify_ok_then_names_the_bad_chunk(ckpt: str, capsys) -> None:
    assert main(["verify", "-q", ckpt]) == 0
    assert "OK" in capsys.readouterr().out
    (data,) = os.listdir(os.path.join(ckpt, "data"))
    file = os.path.join(ckpt, "data", data)
    with open(file, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    assert main(["verify", "-q", ckpt]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and data in out and "['params']['w']" in out and "1 problem" in out


def test_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["verify", str(tmp_path / "empty")]) == 2


def test_python_dash_m_and_console_script(ckpt: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keepax", "show", ckpt], capture_output=True, text=True, check=True
    ).stdout
    assert "['params']['b']" in out
    script = shutil.which("keepax", path=os.path.dirname(sys.executable))
    assert script is not None, "the keepax console script is not installed"
    result = subprocess.run([script, "verify", ckpt], capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout


def test_ls_lists_steps_with_time_size_metrics_and_kind(root: str, capsys) -> None:
    from keepax import policies

    clock = iter(range(0, 10_000, 40)).__next__
    directory = f"{root}/run"
    policy = policies.AnyOf(policies.EveryNSteps(10), policies.EveryInterval(100))
    with keepax.CheckpointManager(directory, save_policy=policy, clock=clock) as manager:
        for step in range(0, 14):
            manager.save(step, {"w": np.ones((16, 16), np.float32)},
                         metrics={"loss": 1.0 / (step + 1), "acc": step / 20})
        manager.wait_until_finished()
        steps = manager.all_steps()
    assert steps == [0, 10, 13]
    assert main(["ls", directory]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["step", "time", "(UTC)", "size", "acc", "loss", "kind", "name"]
    row10 = next(line for line in lines if line.split()[:1] == ["10"])
    assert "permanent" in row10 and "0.5" in row10 and "0.0909091" in row10
    assert "00000010" in row10 and "KiB" in row10
    row13 = next(line for line in lines if line.split()[:2] == ["*", "13"])  # the lowest loss
    assert "temporary" in row13
    assert "3 steps (1 temporary)" in out and "latest 13" in out and "best 13" in out


def test_ls_of_an_empty_or_missing_directory(tmp_path, capsys) -> None:
    os.makedirs(tmp_path / "empty")
    assert main(["ls", str(tmp_path / "empty")]) == 0
    assert "no steps" in capsys.readouterr().out
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ls_works_while_a_manager_holds_the_directory(tmp_path, capsys) -> None:
    directory = str(tmp_path / "run")
    with keepax.CheckpointManager(directory) as manager:
        manager.save(5, {"w": np.zeros(3)})
        assert main(["ls", directory]) == 0
    assert "1 step," in capsys.readouterr().out
