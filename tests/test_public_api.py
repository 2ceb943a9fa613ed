"""Pins the public surface: adding or removing a public name must be a deliberate change."""

from __future__ import annotations

import keepax
import keepax.errors


def test_public_names() -> None:
    assert sorted(keepax.__all__) == sorted([
        "errors", "policies", "save", "save_async", "restore", "inspect", "verify",
        "save_file", "load_file", "open", "Checkpoint", "ChunkInfo",
        "copy", "diff", "export", "gc", "import_orbax",
        "CheckpointInfo", "LeafInfo", "PerProcess", "RestoreStats", "SaveResult", "SaveHandle",
        "SaveRecord",
        "KeepaxError",
        "CheckpointManager", "StepInfo", "KeepaxWarning",
    ])
    for name in keepax.__all__:
        assert hasattr(keepax, name)


def test_error_hierarchy() -> None:
    e = keepax.errors
    assert sorted(e.__all__) == sorted([
        "KeepaxError", "CheckpointNotFoundError", "CheckpointExistsError", "NotCommittedError",
        "CorruptCheckpointError", "FormatVersionError", "TreeMismatchError",
        "UnsupportedLeafError", "PolicyError", "InvalidPathError", "DirectoryLockedError",
        "PeerProcessError", "StepOrderError", "ManagerClosedError", "KeepaxWarning",
    ])
    for name in e.__all__:
        if name == "KeepaxWarning":
            assert issubclass(e.KeepaxWarning, UserWarning)
            continue
        assert issubclass(getattr(e, name), e.KeepaxError)
    assert issubclass(e.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(e.TreeMismatchError, ValueError)
    assert issubclass(e.UnsupportedLeafError, TypeError)


def test_errors_name_path_step_and_leaf() -> None:
    err = keepax.errors.TreeMismatchError("bad", path="/x/ckpt", step=3, leaf="['w']")
    assert str(err) == "[checkpoint /x/ckpt, step 3, leaf ['w']] bad"
    assert (err.path, err.step, err.leaf) == ("/x/ckpt", 3, "['w']")


def test_context_set_after_construction_reaches_the_message() -> None:
    err = keepax.errors.KeepaxError("disk full", path="/x/ckpt")
    err.step = 7
    assert str(err) == "[checkpoint /x/ckpt, step 7] disk full"
