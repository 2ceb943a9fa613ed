"""The manager directory lock: one writer, holder named, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from keepax._src.io import open_root
from keepax._src.io.lock import LOCK_NAME, DirectoryLock
from keepax.errors import DirectoryLockedError, KeepaxError, KeepaxWarning


def _lock(root: str) -> DirectoryLock:
    if not root.startswith("memory://"):
        os.makedirs(root, exist_ok=True)
    return DirectoryLock(open_root(root))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(directory: str, host: str, pid: int) -> str:
    path = os.path.join(directory, LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "time": 0.0, "token": "t"}, f)
    return path


def test_one_holder_at_a_time_and_the_refusal_names_it(root: str) -> None:
    first, second = _lock(root), _lock(root)
    first.acquire()
    assert first.held
    with pytest.raises(DirectoryLockedError) as info:
        second.acquire()
    assert isinstance(info.value, KeepaxError) and info.value.path == root
    message = str(info.value)
    assert socket.gethostname() in message and f"PID {os.getpid()}" in message
    assert "read_only=True" in message and "this process" in message
    first.release()
    second.acquire()
    second.release()
    first.release()  # releasing twice is harmless


def test_lock_file_holds_the_holder_and_is_removed_on_release(tmp_path) -> None:
    lock = _lock(str(tmp_path))
    lock.acquire()
    doc = json.loads((tmp_path / LOCK_NAME).read_text())
    assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]  # no temporary file left
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_file_it_did_not_write(tmp_path) -> None:
    lock = _lock(str(tmp_path))
    lock.acquire()
    path = _write_lock(str(tmp_path), "elsewhere", 1)  # replaced behind our back
    lock.release()
    assert os.path.exists(path)


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path) -> None:
    _write_lock(str(tmp_path), socket.gethostname(), _dead_pid())
    lock = _lock(str(tmp_path))
    with pytest.warns(KeepaxWarning, match="stale lock"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_refused_naming_it(tmp_path) -> None:
    path = _write_lock(str(tmp_path), "node-17", 4242)
    with pytest.raises(DirectoryLockedError, match=r"host node-17, PID 4242") as info:
        _lock(str(tmp_path)).acquire()
    assert path in str(info.value)  # says which file to delete if that process is gone


def test_lock_of_a_live_process_is_refused(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(str(tmp_path), socket.gethostname(), child.pid)
        with pytest.raises(DirectoryLockedError, match=f"PID {child.pid}"):
            _lock(str(tmp_path)).acquire()
    finally:
        child.kill()
        child.wait()


def test_unreadable_lock_file_is_refused(tmp_path) -> None:
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(DirectoryLockedError, match="unreadable"):
        _lock(str(tmp_path)).acquire()
