"""Hostile local file systems: FIFOs, devices and symbolic links inside a checkpoint, and a
full disk. Readers never hang and never read outside the checkpoint; every I/O error names
the file it concerns (issue 12, points 5, 6 and 9)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import keepax
from keepax._src.io import LocalStorage, open_root, split_checkpoint_path
from keepax.errors import CorruptCheckpointError, KeepaxError

TREE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int32)}

# Every reader a checkpoint from someone else goes through.
READERS: dict[str, Callable[[Path], Any]] = {
    "restore": lambda p: keepax.restore(str(p)),
    "inspect": lambda p: keepax.inspect(str(p)),
    "verify": lambda p: keepax.verify(str(p)),
    "open": lambda p: keepax.open(str(p)).restore(),
}


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    keepax.save(str(path), TREE)
    return path


def _data_file(path: Path) -> Path:
    (name,) = os.listdir(path / "data")
    return path / "data" / name


def _refused(call: Callable[[], Any], *needles: str) -> KeepaxError:
    """Runs ``call``, which must fail with a KeepaxError (or, for verify, report a problem)
    whose text contains every needle."""
    try:
        problems = call()
    except KeepaxError as e:
        text = str(e)
        for needle in needles:
            assert needle in text, text
        return e
    assert isinstance(problems, list) and problems, f"nothing refused: {problems!r}"
    text = " ".join(problems)
    for needle in needles:
        assert needle in text, text
    return KeepaxError(text)


# ---------------------------------------------------------------------------------------------
# FIFOs and devices (point 5): refused at once, never opened blocking.


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("entry", ["keepax.commit", "manifest.json", "data"])
def test_a_fifo_in_place_of_a_file_is_refused(tmp_path: Path, reader: str, entry: str) -> None:
    path = _saved(tmp_path)
    target = _data_file(path) if entry == "data" else path / entry
    os.unlink(target)
    os.mkfifo(target)
    if reader == "inspect" and entry == "data":
        keepax.inspect(str(path))  # reads no data file: nothing to refuse
        return
    _refused(lambda: READERS[reader](path), "FIFO", target.name)


@pytest.mark.timeout(60)
def test_a_fifo_passed_to_load_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "state.keepax"
    os.mkfifo(fifo)
    with pytest.raises(CorruptCheckpointError, match="FIFO") as info:
        keepax.load_file(str(fifo))
    assert str(fifo) in str(info.value)


@pytest.mark.timeout(60)
def test_a_fifo_step_does_not_hang_a_manager(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with keepax.CheckpointManager(str(root), async_save=False) as manager:
        manager.save(1, TREE)
        manager.save(2, TREE)
    step = root / sorted(os.listdir(root))[-1]
    os.unlink(step / "manifest.json")
    os.mkfifo(step / "manifest.json")
    with pytest.warns(keepax.KeepaxWarning, match="FIFO"):
        with keepax.CheckpointManager(str(root), read_only=True) as manager:
            assert manager.all_steps() == [1]


def test_a_device_is_refused_without_being_opened(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "zero")
    storage = LocalStorage(tmp_path, follow_symlinks=True)
    with pytest.raises(CorruptCheckpointError, match="character device"):
        storage.open("zero")


# ---------------------------------------------------------------------------------------------
# Symbolic links out of the checkpoint (point 6): refused unless the user opts in.


def _link_data_file_out(path: Path, tmp_path: Path) -> None:
    data = _data_file(path)
    outside = tmp_path / "elsewhere" / data.name
    outside.parent.mkdir()
    os.rename(data, outside)
    os.symlink(outside, data)


def _link_data_dir_out(path: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere-data"
    os.rename(path / "data", outside)
    os.symlink(outside, path / "data")


def _link_manifest_out(path: Path, tmp_path: Path) -> None:
    os.rename(path / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", path / "manifest.json")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("link", [_link_data_file_out, _link_data_dir_out, _link_manifest_out])
def test_a_symlink_out_of_the_checkpoint_is_refused(
    tmp_path: Path, reader: str, link: Callable[[Path, Path], None]
) -> None:
    path = _saved(tmp_path)
    link(path, tmp_path)
    if reader == "inspect" and link is not _link_manifest_out:
        keepax.inspect(str(path))  # reads no data file: nothing to refuse
        return
    _refused(lambda: READERS[reader](path), "outside the checkpoint", "keepax_follow_symlinks")


@pytest.mark.parametrize("link", [_link_data_file_out, _link_data_dir_out])
def test_following_symlinks_out_is_opt_in(
    tmp_path: Path, link: Callable[[Path, Path], None]
) -> None:
    path = _saved(tmp_path)
    link(path, tmp_path)
    options = {"keepax_follow_symlinks": True}
    restored = keepax.restore(str(path), storage_options=options)
    np.testing.assert_array_equal(restored["w"], TREE["w"])
    assert keepax.verify(str(path), storage_options=options) == []


def test_symlinks_inside_the_checkpoint_and_to_it_are_followed(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = _data_file(path)
    os.rename(data, path / "moved")
    os.symlink("../moved", data)  # inside the checkpoint: fine
    os.symlink(path, tmp_path / "latest")  # the checkpoint itself through a link: fine
    np.testing.assert_array_equal(keepax.restore(str(tmp_path / "latest"))["w"], TREE["w"])
    assert keepax.verify(str(tmp_path / "latest")) == []


def test_a_symlinked_single_file_checkpoint_is_itself(tmp_path: Path) -> None:
    keepax.save_file(str(tmp_path / "state.keepax"), TREE)
    os.symlink(tmp_path / "state.keepax", tmp_path / "link.keepax")
    np.testing.assert_array_equal(keepax.load_file(str(tmp_path / "link.keepax"))["b"],
                                  TREE["b"])


def test_the_storage_option_is_checked(tmp_path: Path) -> None:
    assert open_root(tmp_path, {"keepax_follow_symlinks": True}).follow_symlinks  # type: ignore[attr-defined]
    storage, _ = split_checkpoint_path(tmp_path / "x", {"keepax_follow_symlinks": True})
    assert storage.follow_symlinks  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="keepax_follow_symlinks"):
        open_root(tmp_path, {"keepax_follow_symlinks": "yes"})


# ---------------------------------------------------------------------------------------------
# A full disk (point 9): the error names the file, and keeps its errno.

_FULL_DISK = textwrap.dedent("""
    import errno, resource, signal, sys
    import numpy as np
    import keepax
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a fatal signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files over 1 MiB fail
    try:
        keepax.save(sys.argv[1], {"w": np.zeros(1 << 20, np.float32)})
    except OSError as e:
        print(type(e).__name__, e.errno, e.filename, "|", e)
    else:
        print("saved")
""")


def test_a_full_disk_names_the_file_and_keeps_the_errno(tmp_path: Path) -> None:
    """A file size limit (RLIMIT_FSIZE) makes the file system refuse bytes as a full one does
    (EFBIG rather than ENOSPC, through the same write path)."""
    target = tmp_path / "big"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(target)], capture_output=True, text=True,
        env=env, timeout=300, check=True,
    ).stdout.strip().splitlines()[-1]
    kind, code, filename, message = out.split(" ", 3)
    assert kind == "OSError" and int(code) == errno.EFBIG, out
    assert filename.startswith(str(target)) and "/data/" in filename, out
    assert "writing failed" in message, out
    assert not target.exists()  # nothing committed


def test_a_directory_in_place_of_a_file_is_refused(tmp_path: Path) -> None:
    os.mkdir(tmp_path / "dir")
    with pytest.raises(CorruptCheckpointError, match="dir is a directory"):
        LocalStorage(tmp_path).open("dir")
