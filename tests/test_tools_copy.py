"""keepax.copy between local disk, memory:// and S3 (moto): byte-for-byte, verified, committed
last; killed midway (SIGKILL) and run again; whole manager directories."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keepax
from keepax._src.io import memory
from keepax._src.tools.copy import add_copy_parser, copy
from keepax._src.tools.diff import diff
from keepax.errors import CheckpointExistsError, CorruptCheckpointError, NotCommittedError


def _tree(seed=0, n=3, size=1000):
    rng = np.random.default_rng(seed)
    return {"w": [rng.normal(size=size).astype(np.float32) for _ in range(n)], "step": seed}


def _files(path):
    out = {}
    for base, _, names in os.walk(path):
        for name in names:
            full = os.path.join(base, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def test_local_to_memory_to_local_byte_for_byte(tmp_path):
    src = str(tmp_path / "a")
    keepax.save(src, _tree(), metadata={"m": 1})
    try:
        result = copy(src, "memory://copytest/ck")
        assert result.copied == ("memory://copytest/ck",)
        assert keepax.verify("memory://copytest/ck") == []
        back = str(tmp_path / "b")
        copy("memory://copytest/ck", back)
    finally:
        memory.clear("copytest")
    assert _files(back) == _files(src)
    assert diff(src, back).identical
    with pytest.raises(CheckpointExistsError):
        copy(src, back)
    copy(src, back, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no staging left


def test_local_to_s3_and_back(tmp_path, s3):
    src = str(tmp_path / "a")
    keepax.save(src, _tree())
    url = f"{s3.url}/run/ck"
    copy(src, url, storage_options=s3.options)
    assert keepax.verify(url, storage_options=s3.options) == []
    back = str(tmp_path / "b")
    copy(url, back, storage_options=s3.options)
    assert _files(back) == _files(src)


def test_damaged_source_is_not_committed(tmp_path):
    src = str(tmp_path / "a")
    keepax.save(src, _tree())
    (chunk,) = [c for c in keepax.open(src).chunks() if c.leaf == "['w'][1]"]
    with open(os.path.join(src, chunk.file), "r+b") as f:
        f.seek(chunk.offset + 10)
        byte = f.read(1)
        f.seek(chunk.offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError) as e:
        copy(src, str(tmp_path / "b"))
    assert e.value.leaf == "['w'][1]"
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_manager_directory(tmp_path):
    run = str(tmp_path / "run")
    with keepax.CheckpointManager(run, async_save=False) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, _tree(step), metrics={"loss": 1.0 / step})
    dst = str(tmp_path / "copy")
    result = copy(run, dst, steps=[1, 3])
    assert len(result.copied) == 2
    again = copy(run, dst, all_steps=True)
    assert len(again.skipped) == 2 and len(again.copied) == 1
    with keepax.CheckpointManager(dst, read_only=True) as mngr:
        assert mngr.all_steps() == [1, 2, 3] and mngr.metrics(3) == {"loss": 1.0 / 3}
    with pytest.raises(keepax.errors.CheckpointNotFoundError, match="all_steps"):
        copy(run, str(tmp_path / "x"))


_KILLED_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from keepax._src.tools.copy import copy
    src, dst, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def progress(done, total):
        if done >= total // 2:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-copy, as a preempted machine would

    copy(src, dst, progress=progress, storage_options=options or None)
""")


@pytest.mark.parametrize("target", ["local", "s3"])
def test_killed_copy_then_rerun(tmp_path, target, request):
    src = str(tmp_path / "a")
    keepax.save(src, _tree(n=4, size=3 << 20))  # 48 MiB: several 8 MiB blocks
    if target == "s3":
        s3 = request.getfixturevalue("s3")
        dst, options = f"{s3.url}/run/ck", s3.options
    else:
        dst, options = str(tmp_path / "b"), None
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, src, dst,
                            json.dumps(options or {})], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -9, child.stderr
    with pytest.raises((keepax.errors.CheckpointNotFoundError, NotCommittedError)):
        keepax.open(dst, storage_options=options)  # nothing visible
    copy(src, dst, storage_options=options)
    assert keepax.verify(dst, storage_options=options) == []
    assert diff(src, dst, storage_options=options).identical


def test_cli(tmp_path, capsys):
    src = str(tmp_path / "a")
    keepax.save(src, _tree())
    parser = argparse.ArgumentParser()
    add_copy_parser(parser.add_subparsers())
    args = parser.parse_args(["cp", src, str(tmp_path / "b"), "--json", "-q"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["copied"] == [str(tmp_path / "b")]
    args = parser.parse_args(["cp", src, str(tmp_path / "b"), "-q"])
    assert args.run(args) == 2
