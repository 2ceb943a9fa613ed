"""Tests of the one commit protocol (``keepax._src.commit.protocol``), on each storage backend,
and of the commit layer's place below the checkpoint layer."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import numpy as np
import pytest

import keepax
from keepax._src import checkpoint
from keepax._src.commit import protocol
from keepax._src.format.manifest import COMMIT_FILE, MANIFEST_FILE, Manifest
from keepax._src.io import is_hidden_name, local, open_root
from keepax.errors import CheckpointExistsError


def _manifest(value: int) -> Manifest:
    plan = checkpoint.plan_leaves({"a": value, "b": "text"})
    return plan.manifest((), {}, {"v": value}, created=1.0)


def test_a_committed_checkpoint_is_readable_and_nothing_hidden_is_left(root: str) -> None:
    storage = open_root(root)
    with protocol.staged(storage, "ckpt", storage.display("ckpt"), replace=False) as staging:
        nbytes = protocol.commit(staging, _manifest(1))
    assert nbytes == len(storage.read_bytes(f"ckpt/{MANIFEST_FILE}")) + len(
        storage.read_bytes(f"ckpt/{COMMIT_FILE}"))
    assert keepax.restore(f"{root}/ckpt") == {"a": 1, "b": "text"}
    assert not [n for n in storage.list("") if is_hidden_name(n)]


def test_a_failure_before_the_marker_commits_nothing_and_removes_the_staging(root: str) -> None:
    storage = open_root(root)

    def refuse() -> None:
        raise RuntimeError("not now")

    with pytest.raises(RuntimeError, match="not now"):
        with protocol.staged(storage, "ckpt", storage.display("ckpt"), replace=False) as staging:
            protocol.commit(staging, _manifest(1), before_commit=refuse)
    assert not storage.exists(f"ckpt/{COMMIT_FILE}")
    assert not [n for n in storage.list("") if is_hidden_name(n)]
    with pytest.raises(keepax.errors.KeepaxError):
        keepax.restore(f"{root}/ckpt")


def test_committing_over_a_checkpoint_needs_replace(root: str) -> None:
    storage = open_root(root)
    where = storage.display("ckpt")
    with protocol.staged(storage, "ckpt", where, replace=False) as staging:
        protocol.commit(staging, _manifest(1))
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        with protocol.staged(storage, "ckpt", where, replace=False) as staging:
            protocol.commit(staging, _manifest(2))
    assert keepax.inspect(f"{root}/ckpt").metadata == {"v": 1}
    with protocol.staged(storage, "ckpt", where, replace=True) as staging:
        protocol.commit(staging, _manifest(2))
    assert keepax.inspect(f"{root}/ckpt").metadata == {"v": 2}
    assert not [n for n in storage.list("") if is_hidden_name(n)]


@pytest.mark.parametrize("failing", ["/data/", MANIFEST_FILE, COMMIT_FILE])
def test_a_local_save_whose_sync_fails_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # The files' syncs run on other threads (data files while the manifest is built; the
    # manifest beside the marker): a failure there must still stop the commit.
    real = os.fsync

    def fsync(fd: int) -> None:
        if failing in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(local.os, "fsync", fsync)
    state = {f"w{i}": np.full(4, i, np.float32) for i in range(3)}
    with pytest.raises(OSError, match="Input/output error"):
        keepax.save(str(tmp_path / "ckpt"), state)
    assert os.listdir(tmp_path) == []  # nothing committed, the staging directory removed
    monkeypatch.undo()
    keepax.save(str(tmp_path / "ckpt"), state)
    assert keepax.restore(str(tmp_path / "ckpt"))["w2"].tolist() == [2.0] * 4


def _imports(path: Path) -> set[str]:
    """The keepax modules a source file imports (``from a import b`` counts as ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("keepax")}


def test_the_commit_layer_imports_only_the_layers_below_it() -> None:
    allowed = ("keepax.errors.", "keepax._src.io.", "keepax._src.format.", "keepax._src.commit.")
    commit_dir = Path(protocol.__file__).parent
    for path in sorted(commit_dir.glob("*.py")):
        wrong = sorted(n for n in _imports(path) if not n.startswith(allowed))
        assert not wrong, f"{path.name} imports {wrong} from a higher layer"
