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
