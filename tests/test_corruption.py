"""Bad input never loses data and always gets a clear keepax error.

Every test works on real files under ``tmp_path``: checkpoints are saved with the public API,
then damaged on disk (bytes flipped, files truncated or removed, manifests rewritten), and the
public API must answer with the matching :mod:`keepax.errors` error, naming the checkpoint and,
where one is at fault, the leaf. Hostile manifests come with a *consistent* commit marker (its
CRC-32C recomputed) so that the manifest validation itself is what is exercised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faulty_storage import Faults
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keepax
from keepax import errors
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    KeepaxError,
    NotCommittedError,
    TreeMismatchError,
    UnsupportedLeafError,
)

DATA_FILE = "data/p00000-000.safetensors"


# ---------------------------------------------------------------------------------------------
# Helpers.


def make_tree() -> dict[str, Any]:
    """A small tree with one large leaf (read on its own) and several small ones (coalesced)."""
    return {
        "params": {
            "w": np.arange(100_000, dtype=np.float32).reshape(250, 400),  # 400 KB
            "b": np.arange(7, dtype=np.int16) - 3,
        },
        "opt": [np.linspace(0.0, 1.0, 300).reshape(100, 3), jnp.arange(5, dtype=jnp.int32)],
        "raw": b"hello bytes",
        "step": 3,
        "name": "model",
    }


ARRAY_LEAVES = ["['opt'][0]", "['opt'][1]", "['params']['b']", "['params']['w']", "['raw']"]
# A top-level subtree not containing each leaf, to show the rest stays restorable.
OTHER_SUBTREE = {
    "['opt'][0]": "params",
    "['opt'][1]": "params",
    "['params']['b']": "opt",
    "['params']['w']": "opt",
    "['raw']": "params",
}


def to_host(x: Any) -> Any:
    return np.asarray(x) if isinstance(x, jax.Array) else x


def assert_same(got: Any, want: Any) -> None:
    """Bit-exact equality of plain trees (dict/list/tuple of arrays, bytes and values)."""
    want = to_host(want)
    got = to_host(got)
    if isinstance(want, dict):
        assert isinstance(got, dict), type(got)
        assert set(got) == set(want), (list(got), list(want))
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple), type(got)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    else:
        assert type(got) is type(want) and got == want, (got, want)


def save(tmp_path: Any, name: str = "ckpt", tree: Any = None, **kw: Any) -> str:
    path = str(tmp_path / name)
    keepax.save(path, make_tree() if tree is None else tree, **kw)
    return path


def manifest_doc(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return json.loads(f.read())


def chunk_of(path: str, leaf: str) -> dict[str, Any]:
    (entry,) = [x for x in manifest_doc(path)["leaves"] if x["path"] == leaf]
    (chunk,) = entry["chunks"]
    return chunk


def data_region(path: str) -> tuple[int, int]:
    """[start, end) of the chunk bytes in the data file."""
    with open(os.path.join(path, DATA_FILE), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, os.path.getsize(os.path.join(path, DATA_FILE))


def leaf_at(path: str, offset: int) -> str:
    for entry in manifest_doc(path)["leaves"]:
        for c in entry.get("chunks", []):
            if c["offset"] <= offset < c["offset"] + c["nbytes"]:
                return entry["path"]
    raise AssertionError(f"no chunk covers byte {offset}")


def flip(file: str, offset: int, mask: int = 0xFF) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        (b,) = f.read(1)
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def write_manifest(path: str, doc: Any, *, version: str = "1.0", raw: bytes | None = None,
                   marker_extra: dict[str, Any] | None = None) -> None:
    """Writes a manifest and a commit marker that matches it (size and CRC-32C)."""
    data = raw if raw is not None else json.dumps(doc).encode()
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(data)
    marker = {
        "format": "keepax",
        "version": version,
        "manifest_nbytes": len(data),
        "manifest_crc32c": crc32c.crc32c(data),
        "committed": 1.0,
        **(marker_extra or {}),
    }
    with open(os.path.join(path, "keepax.commit"), "wb") as f:
        f.write(json.dumps(marker).encode())


def file_state(root: Any) -> dict[str, Any]:
    """Every entry under root: relative path -> sha256 of a file's bytes, or 'dir'."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for n in filenames:
            full = os.path.join(dirpath, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def hidden_entries(directory: Any) -> list[str]:
    return [n for n in os.listdir(directory) if ".keepax-" in n]


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def no_huge_allocation(limit: int = 1 << 30, seconds: float = 10.0) -> Iterator[None]:
    """Fails if the body allocates more than ``limit`` bytes or runs longer than ``seconds``.

    The address space is capped (on Linux) so that a huge allocation fails at once with
    MemoryError instead of exhausting the machine; the peak RSS is checked afterwards too.
    """
    vm = _vm_size()
    old = resource.getrlimit(resource.RLIMIT_AS)
    capped = False
    if vm is not None:
        cap = vm + limit
        if old[1] == resource.RLIM_INFINITY or cap <= old[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
            capped = True
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    began = time.perf_counter()
    try:
        yield
    finally:
        if capped:
            resource.setrlimit(resource.RLIMIT_AS, old)
    assert time.perf_counter() - began < seconds, "did not fail fast"
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss_after - rss_before < limit, f"peak RSS grew by {rss_after - rss_before} bytes"


# ---------------------------------------------------------------------------------------------
# Missing and foreign paths.


@pytest.mark.parametrize("api", ["restore", "inspect", "verify"])
def test_missing_path(tmp_path, api):
    path = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(CheckpointNotFoundError) as info:
        getattr(keepax, api)(path)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, KeepaxError)
    assert path in str(info.value)
    assert info.value.path == path
    assert not os.path.exists(tmp_path / "does")


def test_missing_path_in_existing_parent(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        keepax.restore(path)
    assert path in str(info.value)
    assert os.listdir(tmp_path) == []


def test_path_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointNotFoundError) as info:
        keepax.restore(str(path))
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("api", ["restore", "inspect", "verify"])
def test_directory_of_random_files_is_not_a_checkpoint(tmp_path, api):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_bytes(os.urandom(100))
    (d / "sub" / "x.bin").write_bytes(os.urandom(1000))
    (d / "manifest.jsonx").write_text("{}")
    before = file_state(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        getattr(keepax, api)(str(d))
    assert str(d) in str(info.value)
    assert "not a keepax checkpoint" in str(info.value)
    assert file_state(tmp_path) == before


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        keepax.restore(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Uncommitted and staging directories.


@pytest.mark.parametrize("api", ["restore", "inspect", "verify"])
def test_uncommitted_checkpoint(tmp_path, api):
    path = save(tmp_path)
    os.remove(os.path.join(path, "keepax.commit"))
    with pytest.raises(NotCommittedError) as info:
        getattr(keepax, api)(path)
    assert path in str(info.value)
    assert "keepax.commit" in str(info.value)
    assert not isinstance(info.value, CheckpointNotFoundError)


def test_partial_checkpoint_with_data_only(tmp_path):
    path = save(tmp_path)
    os.remove(os.path.join(path, "keepax.commit"))
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(NotCommittedError):
        keepax.restore(path)


def test_leftover_staging_dir_is_not_the_checkpoint(tmp_path):
    path = save(tmp_path)
    staging = f"{path}.keepax-tmp-0123456789ab"
    os.rename(path, staging)
    os.remove(os.path.join(staging, "keepax.commit"))
    # The final name does not exist: the save never finished.
    with pytest.raises(CheckpointNotFoundError, match="never finished") as info:
        keepax.restore(path)
    assert path in str(info.value)
    # The staging directory itself is not a committed checkpoint either.
    with pytest.raises((NotCommittedError, CheckpointNotFoundError)):
        keepax.restore(staging)


def test_complete_staging_dir_is_not_a_checkpoint(tmp_path):
    # A staging directory caught between writing its commit marker and its rename (or the old
    # checkpoint parked under a hidden name during an overwrite) is never a checkpoint
    # (storage/base.py: "Names containing this tag are staging or trash directories: never
    # checkpoints").
    path = save(tmp_path)
    staging = f"{path}.keepax-tmp-0123456789ab"
    os.rename(path, staging)
    with pytest.raises(CheckpointNotFoundError):
        keepax.restore(staging)


# ---------------------------------------------------------------------------------------------
# Flipped bytes in data files.


def _check_flip_detected(path: str, offset: int) -> None:
    leaf = leaf_at(path, offset)
    chunk = chunk_of(path, leaf)
    byte_range = f"{chunk['offset']}..{chunk['offset'] + chunk['nbytes']}"
    with pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path)
    assert info.value.leaf == leaf
    assert DATA_FILE in str(info.value)
    assert byte_range in str(info.value)  # FORMAT.md §9: names file, byte range and leaf
    assert path in str(info.value)
    assert "checksum" in str(info.value)
    problems = keepax.verify(path)
    assert problems, "verify found nothing"
    assert any(DATA_FILE in p and leaf in p and byte_range in p for p in problems), problems
    assert len(problems) == 1, problems


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("leaf", ARRAY_LEAVES)
def test_flipped_data_byte_is_detected(tmp_path, leaf, where):
    path = save(tmp_path)
    chunk = chunk_of(path, leaf)
    offset = chunk["offset"] + {
        "first": 0,
        "middle": chunk["nbytes"] // 2,
        "last": chunk["nbytes"] - 1,
    }[where]
    flip(os.path.join(path, DATA_FILE), offset)
    _check_flip_detected(path, offset)
    # Only the damaged leaf is lost: the rest of the tree still restores exactly.
    other = OTHER_SUBTREE[leaf]
    got = keepax.restore(path, select=other)
    assert_same(got, {other: make_tree()[other]})


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_single_bit_flips_are_detected(tmp_path, mask):
    path = save(tmp_path)
    chunk = chunk_of(path, "['params']['w']")
    offset = chunk["offset"] + 12345
    flip(os.path.join(path, DATA_FILE), offset, mask)
    _check_flip_detected(path, offset)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(position=st.floats(0.0, 1.0, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_data_byte_anywhere(tmp_path, position, mask):
    path = str(tmp_path / "fuzz")
    if not os.path.exists(path):
        save(tmp_path, "fuzz")
    start, end = data_region(path)
    offset = start + int(position * (end - start))
    file = os.path.join(path, DATA_FILE)
    flip(file, offset, mask)
    try:
        _check_flip_detected(path, offset)
    finally:
        flip(file, offset, mask)  # undo, for the next example
    assert keepax.verify(path) == []


@pytest.mark.parametrize("where", ["length-low", "length-high", "brace", "middle", "padding"])
def test_flipped_safetensors_header_byte_does_not_affect_data(tmp_path, where):
    # keepax reads chunks at the offsets its manifest records and never parses the safetensors
    # header when restoring, so the data restores exactly; but the header is what other tools
    # read, so verify checks it against the manifest and reports the damage.
    path = save(tmp_path)
    start, _ = data_region(path)
    offset = {"length-low": 0, "length-high": 7, "brace": 8, "middle": start // 2,
              "padding": start - 1}[where]
    flip(os.path.join(path, DATA_FILE), offset)
    assert_same(keepax.restore(path), make_tree())
    problems = keepax.verify(path)
    assert problems and all(DATA_FILE in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# Truncated, grown and missing data files.


@pytest.mark.parametrize("size", ["minus-one", "half", "header-only", "empty"])
def test_truncated_data_file(tmp_path, size):
    path = save(tmp_path)
    file = os.path.join(path, DATA_FILE)
    full = os.path.getsize(file)
    start, _ = data_region(path)
    new = {"minus-one": full - 1, "half": full // 2, "header-only": start, "empty": 0}[size]
    os.truncate(file, new)
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        keepax.restore(path)
    assert DATA_FILE in str(info.value) and path in str(info.value)
    assert f"{new} bytes" in str(info.value)
    problems = keepax.verify(path)
    assert problems and any(DATA_FILE in p and "truncated" in p for p in problems), problems
    # Leaves in the manifest alone still come back.
    assert keepax.restore(path, select="step") == {"step": 3}


def test_grown_data_file(tmp_path):
    path = save(tmp_path)
    with open(os.path.join(path, DATA_FILE), "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(CorruptCheckpointError, match=DATA_FILE):
        keepax.restore(path)
    assert keepax.verify(path)


def test_missing_data_file(tmp_path):
    path = save(tmp_path)
    os.remove(os.path.join(path, DATA_FILE))
    with pytest.raises(CorruptCheckpointError, match="missing") as info:
        keepax.restore(path)
    assert DATA_FILE in str(info.value) and path in str(info.value)
    problems = keepax.verify(path)
    assert problems and DATA_FILE in problems[0]
    # inspect reads no data, so it still works.
    assert keepax.inspect(path).metadata == {}


def test_missing_data_directory(tmp_path):
    path = save(tmp_path)
    shutil.rmtree(os.path.join(path, "data"))
    with pytest.raises(CorruptCheckpointError, match="missing"):
        keepax.restore(path)


# ---------------------------------------------------------------------------------------------
# Damaged manifests and commit markers.


@pytest.mark.parametrize("api", ["restore", "inspect", "verify"])
@pytest.mark.parametrize("damage", ["truncate", "empty", "invalid-json", "modified", "missing"])
def test_damaged_manifest(tmp_path, api, damage):
    path = save(tmp_path)
    file = os.path.join(path, "manifest.json")
    with open(file, "rb") as f:
        data = f.read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "invalid-json":
        data = b"#" + data[1:]  # same length
    elif damage == "modified":
        data = data.replace(b'"model"', b'"modex"')  # valid JSON, same length
        assert len(data) == os.path.getsize(file)
    if damage == "missing":
        os.remove(file)
    else:
        with open(file, "wb") as f:
            f.write(data)
    with pytest.raises(CorruptCheckpointError) as info:
        getattr(keepax, api)(path)
    assert path in str(info.value)
    assert "manifest.json" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\xff\xfe\xfd", b"[]", b"null", b'"manifest"', b"{}", b'{"format": "keepax"}',
     b"\x00" * 100],
    ids=["empty", "unclosed", "not-utf8", "list", "null", "string", "empty-object", "no-version",
         "zeros"],
)
def test_invalid_manifest_with_matching_marker(tmp_path, raw):
    path = save(tmp_path)
    write_manifest(path, None, raw=raw)
    for api in (keepax.restore, keepax.inspect, keepax.verify):
        with pytest.raises(CorruptCheckpointError) as info:
            api(path)
        assert path in str(info.value)


@pytest.mark.parametrize(
    "marker",
    [b"", b"{", b"\xff", b"[]", b"{}", b'{"format":"keepax","version":"1.0"}',
     b'{"format":"orbax","version":"1.0","manifest_nbytes":1,"manifest_crc32c":1,"committed":0}',
     b'{"format":"keepax","version":"1.0","manifest_nbytes":-1,"manifest_crc32c":1,"committed":0}',
     b'{"format":"keepax","version":"1.0","manifest_nbytes":"9","manifest_crc32c":1,'
     b'"committed":0}'],
    ids=["empty", "unclosed", "not-utf8", "list", "empty-object", "no-sizes", "foreign-format",
         "negative", "string-size"],
)
def test_damaged_commit_marker(tmp_path, marker):
    path = save(tmp_path)
    with open(os.path.join(path, "keepax.commit"), "wb") as f:
        f.write(marker)
    with pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path)
    assert path in str(info.value)


def test_marker_with_wrong_manifest_size(tmp_path):
    path = save(tmp_path)
    file = os.path.join(path, "keepax.commit")
    with open(file, "rb") as f:
        marker = json.loads(f.read())
    marker["manifest_nbytes"] += 1
    with open(file, "w") as f:
        json.dump(marker, f)
    with pytest.raises(CorruptCheckpointError, match="does not match its checksum"):
        keepax.restore(path)


def test_deeply_nested_commit_marker(tmp_path):
    path = save(tmp_path)
    with open(os.path.join(path, "keepax.commit"), "wb") as f:
        f.write(b"[" * 100_000)
    with pytest.raises(CorruptCheckpointError):
        keepax.restore(path)


@pytest.mark.parametrize("which", ["manifest", "marker"])
def test_integer_with_too_many_digits(tmp_path, which):
    path = save(tmp_path)
    if which == "manifest":
        doc = manifest_doc(path)
        doc["created"] = "HUGE"
        raw = json.dumps(doc).encode().replace(b'"HUGE"', b"9" * 5000)
        write_manifest(path, None, raw=raw)
    else:
        with open(os.path.join(path, "keepax.commit"), "wb") as f:
            f.write(b'{"format":"keepax","version":"1.0","manifest_nbytes":' + b"9" * 5000 + b"}")
    with pytest.raises(CorruptCheckpointError):
        keepax.restore(path)


# ---------------------------------------------------------------------------------------------
# Hostile manifests (valid JSON, consistent commit marker).


def _leaf(doc: dict[str, Any], path: str) -> dict[str, Any]:
    (entry,) = [x for x in doc["leaves"] if x["path"] == path]
    return entry


def _w(doc: dict[str, Any]) -> dict[str, Any]:
    return _leaf(doc, "['params']['w']")


def _wc(doc: dict[str, Any]) -> dict[str, Any]:
    return _w(doc)["chunks"][0]


def _set(getter: Callable[[dict[str, Any]], dict[str, Any]], **fields: Any) -> Callable[..., None]:
    def mutate(doc: dict[str, Any]) -> None:
        getter(doc).update(fields)

    return mutate


def _huge_consistent(elements: int) -> Callable[..., None]:
    """A leaf declaring `elements` float32 elements, with chunk and file sizes that agree, so
    only the real file size can tell it is a lie."""

    def mutate(doc: dict[str, Any]) -> None:
        w, c = _w(doc), _wc(doc)
        w["shape"] = [elements]
        end = doc["files"][0]["nbytes"]
        c.update(shape=[elements], start=[0], offset=end, nbytes=4 * elements)
        doc["files"][0]["nbytes"] = end + 4 * elements

    return mutate


def _many_files(doc: dict[str, Any], n: int = 10_000) -> None:
    doc["files"] += [{"name": f"data/p00000-{i:06d}.safetensors", "nbytes": 10**6}
                     for i in range(1, n)]
    _wc(doc)["file"] = n - 1


def _del(key: str) -> Callable[..., None]:
    def mutate(doc: dict[str, Any]) -> None:
        del doc[key]

    return mutate


# Hostile manifests the validator must reject while opening: restore, inspect and verify all
# raise CorruptCheckpointError.
INVALID_MANIFESTS: dict[str, Callable[..., None]] = {
    "shape-1e12-elements": _set(_w, shape=[10**12]),
    "shape-1e12-2d": _set(_w, shape=[10**6, 10**6]),
    "shape-65-dims": _set(_w, shape=[1] * 65),
    "chunk-nbytes-beyond-file": _set(_wc, nbytes=10**9),
    "chunk-offset-beyond-file": lambda d: _wc(d).update(offset=d["files"][0]["nbytes"] + 1),
    "chunk-offset-huge": _set(_wc, offset=2**70),
    "file-nbytes-smaller-than-chunks": lambda d: d["files"][0].update(nbytes=1000),
    "negative-shape": _set(_w, shape=[-250, 400]),
    "negative-offset": _set(_wc, offset=-8),
    "negative-nbytes": _set(_wc, nbytes=-1),
    "negative-file": _set(_wc, file=-1),
    "negative-start": _set(_wc, start=[-1, 0]),
    "negative-file-nbytes": lambda d: d["files"][0].update(nbytes=-1),
    "negative-crc": _set(_wc, crc32c=-5),
    "shape-string": _set(_w, shape="250,400"),
    "shape-floats": _set(_w, shape=[250.0, 400.0]),
    "shape-bools": _set(_w, shape=[True, 400]),
    "shape-null": _set(_w, shape=None),
    "offset-string": lambda d: _wc(d).update(offset=str(_wc(d)["offset"])),
    "offset-float": lambda d: _wc(d).update(offset=float(_wc(d)["offset"])),
    "nbytes-bool": _set(_wc, nbytes=True),
    "chunks-object": _set(_w, chunks={}),
    "chunk-list": lambda d: _w(d).update(chunks=[[0, 0, 0]]),
    "chunk-without-crc": lambda d: _wc(d).pop("crc32c"),
    "leaves-object": lambda d: d.update(leaves={}),
    "leaf-is-list": lambda d: d["leaves"].append([1, 2]),
    "leaf-path-int": _set(_w, path=5),
    "leaf-type-unknown": _set(_w, type="pickle"),
    "leaf-type-missing": lambda d: _w(d).pop("type"),
    "value-leaf-without-value": lambda d: _leaf(d, "['step']").pop("value"),
    "files-string": lambda d: d.update(files="data/p00000-000.safetensors"),
    "file-entry-list": lambda d: d.update(files=[["data/p00000-000.safetensors", 1]]),
    "file-nbytes-null": lambda d: d["files"][0].update(nbytes=None),
    "dtype-object": _set(_w, dtype="object"),
    "dtype-O": _set(_w, dtype="O"),
    "dtype-unicode": _set(_w, dtype="<U5"),
    "dtype-nonsense": _set(_w, dtype="nonsense"),
    "dtype-empty": _set(_w, dtype=""),
    "dtype-int": _set(_w, dtype=5),
    "dtype-null": _set(_w, dtype=None),
    "dtype-void": _set(_w, dtype="V4"),
    "dtype-datetime": _set(_w, dtype="datetime64[s]"),
    "dtype-structured": _set(_w, dtype="f4,f4"),
    "dtype-other-size": _set(_w, dtype="float64"),  # chunk size no longer matches
    "name-dotdot": lambda d: d["files"][0].update(name="../p00000-000.safetensors"),
    "name-dotdot-inside": lambda d: d["files"][0].update(name="data/../../x.safetensors"),
    "name-dotdot-only": lambda d: d["files"][0].update(name="data/...safetensors"),
    "name-absolute": lambda d: d["files"][0].update(name="/etc/passwd"),
    "name-absolute-data": lambda d: d["files"][0].update(name="/tmp/data/x.safetensors"),
    "name-subdir": lambda d: d["files"][0].update(name="data/sub/x.safetensors"),
    "name-backslash": lambda d: d["files"][0].update(name="data\\..\\x.safetensors"),
    "name-not-safetensors": lambda d: d["files"][0].update(name="data/x.pkl"),
    "name-manifest": lambda d: d["files"][0].update(name="manifest.json"),
    "name-int": lambda d: d["files"][0].update(name=0),
    "volume-too-small": lambda d: _wc(d).update(shape=[125, 400], nbytes=125 * 400 * 4),
    "chunk-outside-array": lambda d: _wc(d).update(start=[1, 0]),
    "chunk-wrong-rank": lambda d: _wc(d).update(start=[0], shape=[100_000]),
    "chunk-size-mismatch": lambda d: _wc(d).update(nbytes=_wc(d)["nbytes"] - 4),
    "chunk-file-out-of-range": _set(_wc, file=1),
    "chunk-file-huge": _set(_wc, file=10**18),
    "chunks-claim-file-twice": lambda d: _w(d).update(chunks=[_wc(d), _wc(d)], shape=[500, 400]),
    "prngkey-without-impl": lambda d: _w(d).update(type="prngkey"),
    "version-number": lambda d: d.update(version=1.0),
    "version-garbage": lambda d: d.update(version="one.zero"),
    "version-missing": _del("version"),
    "format-foreign": lambda d: d.update(format="orbax"),
    "format-missing": _del("format"),
    "tree-missing": _del("tree"),
    "tree-list": lambda d: d.update(tree=[]),
    "metadata-list": lambda d: d.update(metadata=[1]),
    "writer-string": lambda d: d.update(writer="me"),
    "created-string": lambda d: d.update(created="yesterday"),
    "not-an-object": lambda d: (d.clear(), d.update(x=1)),
}


@pytest.mark.parametrize("mutate", INVALID_MANIFESTS.values(), ids=INVALID_MANIFESTS.keys())
def test_hostile_manifest_rejected_while_opening(tmp_path, mutate):
    path = save(tmp_path)
    doc = manifest_doc(path)
    mutate(doc)
    write_manifest(path, doc)
    before = file_state(tmp_path)
    for api in (keepax.restore, keepax.inspect, keepax.verify):
        with no_huge_allocation(), pytest.raises(CorruptCheckpointError) as info:
            api(path)
        assert path in str(info.value)
        assert "manifest" in str(info.value)
    assert file_state(tmp_path) == before


# Hostile manifests whose every field is plausible but which lie about the data (or about the
# tree structure). restore must raise CorruptCheckpointError, verify must report a problem or
# raise CorruptCheckpointError, inspect (which reads no data) may succeed; none may allocate
# what the manifest claims or raise anything but a keepax error.
INCONSISTENT_MANIFESTS: dict[str, Callable[..., None]] = {
    "many-files-missing": lambda d: _many_files(d, 500),
    "file-renamed": lambda d: d["files"][0].update(name="data/p00000-001.safetensors"),
    "file-name-trailing-newline": lambda d: d["files"][0].update(
        name=d["files"][0]["name"] + "\n"
    ),
    "crc-wrong": lambda d: _wc(d).update(crc32c=(_wc(d)["crc32c"] + 1) % 2**32),
    "crc-huge": _set(_wc, crc32c=2**64),
    "chunk-offset-shifted": lambda d: _wc(d).update(offset=_wc(d)["offset"] + 4),
    "chunk-offset-in-header": _set(_wc, offset=0),
}
HUGE_MANIFESTS: dict[str, Callable[..., None]] = {
    "declares-1e12-elements": _huge_consistent(10**12),
    "declares-3GB": _huge_consistent(750_000_000),
}


def _check_inconsistent(path: str, expect_verify_problem: bool = True) -> None:
    with no_huge_allocation(), pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path)
    assert path in str(info.value)
    with no_huge_allocation():
        try:
            problems = keepax.verify(path)
        except CorruptCheckpointError as e:
            assert path in str(e)
        else:
            if expect_verify_problem:
                assert problems
    with no_huge_allocation():
        try:
            keepax.inspect(path)
        except CorruptCheckpointError as e:
            assert path in str(e)


@pytest.mark.parametrize(
    "mutate", INCONSISTENT_MANIFESTS.values(), ids=INCONSISTENT_MANIFESTS.keys()
)
def test_hostile_manifest_lying_about_data(tmp_path, mutate):
    path = save(tmp_path)
    doc = manifest_doc(path)
    mutate(doc)
    write_manifest(path, doc)
    _check_inconsistent(path)


def test_hostile_manifest_listing_many_files_fails_fast(tmp_path):
    # 10,000 listed data files (the referenced one missing): validation must stay linear.
    path = save(tmp_path)
    doc = manifest_doc(path)
    _many_files(doc, 10_000)
    write_manifest(path, doc)
    with no_huge_allocation(seconds=1.0), pytest.raises(CorruptCheckpointError, match="missing"):
        keepax.restore(path)


def test_hostile_manifest_declaring_huge_array_restore(tmp_path):
    path = save(tmp_path)
    doc = manifest_doc(path)
    _huge_consistent(10**12)(doc)
    write_manifest(path, doc)
    with no_huge_allocation(), pytest.raises(CorruptCheckpointError, match="truncated") as info:
        keepax.restore(path)
    assert path in str(info.value) and DATA_FILE in str(info.value)
    info_ = keepax.inspect(path)  # reads no data, allocates nothing
    (w,) = [leaf for leaf in info_.leaves if leaf.path == "['params']['w']"]
    assert w.shape == (10**12,)


@pytest.mark.parametrize("mutate", HUGE_MANIFESTS.values(), ids=HUGE_MANIFESTS.keys())
def test_hostile_manifest_declaring_huge_array_verify(tmp_path, mutate):
    path = save(tmp_path)
    doc = manifest_doc(path)
    mutate(doc)
    write_manifest(path, doc)
    with no_huge_allocation():
        problems = keepax.verify(path)
    assert problems and "truncated" in problems[0]


@pytest.mark.parametrize(
    "name", ["finfo", "iinfo", "__name__", "__version__", "float32 ", "Float32", "f4", "<f4"]
)
def test_hostile_dtype_names_that_are_ml_dtypes_attributes(tmp_path, name):
    path = save(tmp_path)
    doc = manifest_doc(path)
    # A leaf whose chunk sizes are consistent with an 8-byte item (dtype('O') on 64-bit).
    entry = _leaf(doc, "['opt'][0]")  # float64, 8-byte items
    entry["dtype"] = name
    write_manifest(path, doc)
    for api in (keepax.restore, keepax.inspect, keepax.verify):
        with pytest.raises(CorruptCheckpointError):
            api(path)



@pytest.mark.parametrize(
    "case",
    [
        "unknown-node-kind",
        "node-not-object",
        "children-not-list",
        "keys-children-mismatch",
        "bad-key-encoding",
        "duplicate-leaf-index",
        "leaf-index-negative",
        "leaf-index-string",
        "duplicate-dict-keys",
        "float-key-short",
        "leaf-index-out-of-range",
    ],
)
def test_hostile_tree(tmp_path, case):
    path = save(tmp_path)
    doc = manifest_doc(path)
    tree = doc["tree"]
    assert tree["keys"] == ["name", "opt", "params", "raw", "step"]
    if case == "unknown-node-kind":
        tree["c"][1]["k"] = "set"
    elif case == "node-not-object":
        tree["c"][1]["c"][0] = 5
    elif case == "children-not-list":
        tree["c"][1]["c"] = {"0": {"k": "leaf", "i": 1}}
    elif case == "keys-children-mismatch":
        tree["keys"].append("extra")
    elif case == "bad-key-encoding":
        tree["keys"][0] = {"pickle": "x"}
    elif case == "duplicate-leaf-index":
        tree["c"][0]["i"] = tree["c"][4]["i"]
    elif case == "leaf-index-negative":
        tree["c"][0]["i"] = -1
    elif case == "leaf-index-string":
        tree["c"][0]["i"] = "0"
    elif case == "float-key-short":
        tree["keys"][0] = {"float": "00"}
    elif case == "duplicate-dict-keys":
        tree["keys"][0] = "opt"  # leaf 0 now sits at ['opt'] too
        doc["leaves"][0]["path"] = "['opt']"
    elif case == "leaf-index-out-of-range":
        tree["c"][0]["i"] = 17
    write_manifest(path, doc)
    for api in (keepax.restore, keepax.inspect):
        with pytest.raises(CorruptCheckpointError):
            api(path)


def test_hostile_tree_error_names_checkpoint(tmp_path):
    path = save(tmp_path)
    doc = manifest_doc(path)
    doc["tree"]["c"][1]["k"] = "set"
    write_manifest(path, doc)
    with pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path)
    assert path in str(info.value)


def test_hostile_leaf_paths_swapped(tmp_path):
    tree = {"a": np.zeros(3, np.float32), "b": np.ones(3, np.float32)}
    path = save(tmp_path, tree=tree)
    doc = manifest_doc(path)
    doc["leaves"][0]["path"], doc["leaves"][1]["path"] = "['b']", "['a']"
    write_manifest(path, doc)
    # FORMAT.md 5.5 rule 7: a leaf's path must equal the key path of its tree position;
    # otherwise restore(like=...) would join leaves by the lying path.
    for api in (keepax.restore, keepax.inspect):
        with pytest.raises(CorruptCheckpointError) as info:
            api(path)
        assert path in str(info.value)
    with pytest.raises(CorruptCheckpointError):
        keepax.restore(path, like=tree)


@pytest.mark.parametrize(
    "case",
    ["float-not-hex", "float-short", "float-long", "int-string", "int-float", "complex-scalar",
     "complex-three", "bool-int", "str-list",
     "float-uppercase", "float-spaces"],
)
def test_hostile_value_leaves(tmp_path, case):
    path = save(tmp_path)
    doc = manifest_doc(path)
    step = _leaf(doc, "['step']")
    step.update({
        "float-not-hex": {"type": "float", "value": "zz"},
        "float-short": {"type": "float", "value": "3fe0"},
        "float-long": {"type": "float", "value": "3fe000000000000000"},
        "float-uppercase": {"type": "float", "value": "3FE0000000000000"},
        "float-spaces": {"type": "float", "value": "3f e0 00 00 00 00 00 00"},
        "int-string": {"value": "3"},
        "int-float": {"value": 3.0},
        "complex-scalar": {"type": "complex", "value": 1.5},
        "complex-three": {"type": "complex", "value": ["3fe0000000000000"] * 3},
        "bool-int": {"type": "bool", "value": 1},
        "str-list": {"type": "str", "value": ["a"]},
    }[case])
    write_manifest(path, doc)
    with pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path)
    assert info.value.leaf == "['step']"
    assert path in str(info.value)



@pytest.mark.parametrize("case", ["impl-unknown", "impl-empty", "shape-not-key-shape",
                                  "dtype-not-uint32"])
@pytest.mark.parametrize("with_like", [False, True])
def test_hostile_prngkey(tmp_path, case, with_like):
    tree = {"key": jax.random.key(0)}
    path = save(tmp_path, tree=tree)
    doc = manifest_doc(path)
    entry = doc["leaves"][0]
    c = entry["chunks"][0]
    if case == "impl-unknown":
        entry["impl"] = "nonsense"
    elif case == "impl-empty":
        entry["impl"] = ""
    elif case == "shape-not-key-shape":  # threefry key data ends in 2; claim 1 element
        with open(os.path.join(path, DATA_FILE), "rb") as f:
            data = f.read()[c["offset"] :][:4]
        entry["shape"] = [1]
        c.update(shape=[1], nbytes=4, crc32c=crc32c.crc32c(data))
    else:
        entry["dtype"] = "float32"
    write_manifest(path, doc)
    with pytest.raises(CorruptCheckpointError) as info:
        keepax.restore(path, like=tree if with_like else None)
    assert info.value.leaf == "['key']"


def test_hostile_overlapping_chunks(tmp_path):
    # a (2, 4) and b (1, 4) int32 are stored back to back. The hostile manifest gives `a` two
    # chunks that both start at row 0 (row 1 is never written) with correct CRCs.
    path = save(tmp_path, tree={"a": np.full((2, 4), 7, np.int32),
                                "b": np.full((1, 4), 9, np.int32)})
    doc = manifest_doc(path)
    a, b = _leaf(doc, "['a']"), _leaf(doc, "['b']")
    first = dict(a["chunks"][0], shape=[1, 4], nbytes=16)
    with open(os.path.join(path, DATA_FILE), "rb") as f:
        data = f.read()
    first["crc32c"] = crc32c.crc32c(data[first["offset"] : first["offset"] + 16])
    second = dict(b["chunks"][0])  # b's bytes, claimed for a's row 0 too
    a["chunks"] = [first, second]
    b["chunks"] = []
    b["shape"] = [0, 4]
    write_manifest(path, doc)
    for api in (keepax.restore, keepax.inspect, keepax.verify):
        with pytest.raises(CorruptCheckpointError):
            api(path)


def test_hostile_chunks_sharing_file_bytes(tmp_path):
    # a (3, 4) int32 is tiled correctly by two chunks, rows 0-1 and row 2, but both chunks
    # point at the same file offset (row 2's CRC is that of row 0's bytes). FORMAT.md 5.5
    # rule 5: chunks of a file occupy pairwise disjoint byte ranges, else the manifest is
    # rejected.
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = save(tmp_path, tree={"a": a})
    doc = manifest_doc(path)
    entry = _leaf(doc, "['a']")
    c = entry["chunks"][0]
    with open(os.path.join(path, DATA_FILE), "rb") as f:
        data = f.read()[c["offset"] :]
    top = dict(c, shape=[2, 4], nbytes=32, crc32c=crc32c.crc32c(data[:32]))
    bottom = dict(c, start=[2, 0], shape=[1, 4], nbytes=16, crc32c=crc32c.crc32c(data[:16]))
    entry["chunks"] = [top, bottom]
    write_manifest(path, doc)
    for api in (keepax.restore, keepax.inspect, keepax.verify):
        with pytest.raises(CorruptCheckpointError) as info:
            api(path)
        assert path in str(info.value)


# ---------------------------------------------------------------------------------------------
# Format versions.


def _rewrite_version(path: str, manifest_version: str, marker_version: str,
                     extra: bool = False) -> None:
    doc = manifest_doc(path)
    doc["version"] = manifest_version
    marker_extra = None
    if extra:
        # FORMAT.md 1.2: unknown members are ignored at every level.
        doc["future_feature"] = {"compression": None, "levels": [1, 2]}
        for entry in doc["leaves"]:
            entry["future_hint"] = 42
            for chunk in entry.get("chunks", []):
                chunk["future_hint"] = {"codec": "none"}
        doc["files"][0]["future_hint"] = "x"
        doc["tree"]["future_hint"] = True
        doc["tree"]["c"][2]["future_hint"] = [1]
        marker_extra = {"future_hint": "y"}
    write_manifest(path, doc, version=marker_version, marker_extra=marker_extra)


@pytest.mark.parametrize(
    ("manifest_version", "marker_version"),
    [("2.0", "2.0"), ("1.0", "2.0"), ("2.0", "1.0"), ("17.3", "17.3")],
)
@pytest.mark.parametrize("api", ["restore", "inspect", "verify"])
def test_newer_major_version(tmp_path, api, manifest_version, marker_version):
    path = save(tmp_path)
    _rewrite_version(path, manifest_version, marker_version)
    with pytest.raises(FormatVersionError, match="upgrade keepax") as info:
        getattr(keepax, api)(path)
    assert path in str(info.value)
    assert not isinstance(info.value, CorruptCheckpointError)
    newer = max(manifest_version, marker_version, key=lambda v: int(v.split(".")[0]))
    assert newer in str(info.value)  # names the version found...
    assert "1." in str(info.value)  # ...and the one this keepax reads


@pytest.mark.parametrize("where", ["manifest", "marker"])
def test_newer_major_version_checked_before_other_members(tmp_path, where):
    # FORMAT.md 1.2: the version is checked before any other member is interpreted, so a
    # future format with a different layout gets "upgrade", not "damaged".
    path = save(tmp_path)
    if where == "manifest":
        doc = {"format": "keepax", "version": "2.0", "files": "elsewhere", "leaves": 7}
        write_manifest(path, doc, version="1.0")
    else:
        with open(os.path.join(path, "keepax.commit"), "w") as f:
            json.dump({"format": "keepax", "version": "2.0", "manifest": {"nbytes": 1}}, f)
    with pytest.raises(FormatVersionError, match="upgrade keepax"):
        keepax.restore(path)


def test_version_zero_is_rejected(tmp_path):
    path = save(tmp_path)
    _rewrite_version(path, "0.9", "0.9")
    with pytest.raises(FormatVersionError):
        keepax.restore(path)


def test_optional_manifest_members_absent(tmp_path):
    path = save(tmp_path)
    doc = manifest_doc(path)
    for key in ("created", "writer", "metadata"):
        del doc[key]
    write_manifest(path, doc)
    assert_same(keepax.restore(path), make_tree())
    info = keepax.inspect(path)
    assert info.metadata == {} and info.created == 0


def test_unknown_entries_in_checkpoint_directory_are_ignored(tmp_path):
    # FORMAT.md 2: readers ignore other entries in the directory.
    path = save(tmp_path)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("hello")
    with open(os.path.join(path, "data", "p00001-000.safetensors"), "wb") as f:
        f.write(os.urandom(100))
    os.mkdir(os.path.join(path, "extra"))
    assert_same(keepax.restore(path), make_tree())
    assert keepax.verify(path) == []


def test_newer_minor_version_with_unknown_fields_restores(tmp_path):
    path = save(tmp_path)
    _rewrite_version(path, "1.7", "1.7", extra=True)
    assert_same(keepax.restore(path), make_tree())
    assert keepax.inspect(path).format_version == "1.7"
    assert keepax.verify(path) == []


# ---------------------------------------------------------------------------------------------
# Hostile keys.

HOSTILE_KEYS = ["/", "a/b", "..", ".", "\x00", "a\x00b", "../../etc", "../../../../tmp/x",
                "/tmp/x", "/etc/passwd", "", " ", "\n", "data", "manifest.json",
                "keepax.commit", "ckpt.keepax-tmp-0", "é€𝄞", "'\"[]"]


def test_hostile_keys_round_trip_without_escaping(tmp_path):
    outside = ["/tmp/x", "/etc/passwd", "/tmp/data", str(tmp_path.parent / "x")]
    outside_before = {p: os.path.lexists(p) for p in outside}
    inner = tmp_path / "work"
    inner.mkdir()
    tree = {k: np.full((3,), i, np.int32) for i, k in enumerate(HOSTILE_KEYS)}
    tree["nested"] = {k: {k: f"value {i}"} for i, k in enumerate(HOSTILE_KEYS)}
    before = file_state(tmp_path)
    path = str(inner / "ckpt")
    keepax.save(path, tree)
    after = file_state(tmp_path)
    created = sorted(set(after) - set(before))
    assert all(p.startswith(os.path.join("work", "ckpt") + os.sep) or p == "work/ckpt"
               for p in created), created
    assert sorted(os.listdir(path)) == ["data", "keepax.commit", "manifest.json"]
    assert os.listdir(os.path.join(path, "data")) == [DATA_FILE.split("/")[1]]
    assert {p: os.path.lexists(p) for p in outside} == outside_before
    assert_same(keepax.restore(path), tree)
    assert_same(keepax.restore(path, like=tree), tree)
    assert keepax.verify(path) == []
    # Selecting by tuple of keys reaches exactly the hostile key.
    got = keepax.restore(path, select=[("a/b",)])
    assert_same(got, {"a/b": tree["a/b"]})


# ---------------------------------------------------------------------------------------------
# Existing checkpoints: overwrite=False and failing overwrites.


def test_existing_checkpoint_not_overwritten(tmp_path):
    path = save(tmp_path)
    before = file_state(tmp_path)
    with pytest.raises(CheckpointExistsError) as info:
        keepax.save(path, {"other": np.zeros(3)})
    assert isinstance(info.value, FileExistsError)
    assert path in str(info.value)
    assert file_state(tmp_path) == before
    assert_same(keepax.restore(path), make_tree())


@pytest.mark.parametrize("kind", ["file", "directory", "uncommitted"])
def test_existing_non_checkpoint_not_overwritten(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"precious")
    elif kind == "directory":
        target.mkdir()
        (target / "precious.txt").write_bytes(b"precious")
    else:
        save(tmp_path, "target")
        os.remove(target / "keepax.commit")
    before = file_state(tmp_path)
    with pytest.raises(CheckpointExistsError):
        keepax.save(str(target), make_tree())
    assert file_state(tmp_path) == before


def test_overwrite_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "home"
    target.mkdir()
    (target / "thesis.tex").write_bytes(b"precious")
    before = file_state(tmp_path)
    with pytest.raises(KeepaxError):
        keepax.save(str(target), make_tree(), overwrite=True)
    assert file_state(tmp_path) == before


@pytest.mark.parametrize("name", ["ckpt.keepax-tmp-0123456789ab", "x.keepax-old-1", "a.keepax-"])
def test_save_refuses_hidden_names(tmp_path, name):
    # FORMAT.md 2: writers never create a checkpoint whose final name contains '.keepax-'.
    with pytest.raises(KeepaxError):
        keepax.save(str(tmp_path / name), make_tree())
    assert os.listdir(tmp_path) == []


def test_concurrent_saves_to_one_name(tmp_path):
    # FORMAT.md 3.3: two concurrent saves to the same new name: exactly one succeeds.
    import threading

    path = str(tmp_path / "race")
    outcomes: list[Any] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        try:
            keepax.save(path, {"writer": np.full(100_000, i, np.int32), "i": i})
            outcomes.append(i)
        except CheckpointExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "exists"]
    assert len(outcomes) == 6 and len(winners) == 1, outcomes
    got = keepax.restore(path)
    assert got["i"] == winners[0]
    np.testing.assert_array_equal(got["writer"], np.full(100_000, winners[0], np.int32))
    assert os.listdir(tmp_path) == ["race"]


def test_overwrite_replaces(tmp_path):
    path = save(tmp_path)
    new = {"x": np.arange(4.0), "y": "new"}
    keepax.save(path, new, overwrite=True)
    assert_same(keepax.restore(path), new)
    assert keepax.verify(path) == []
    assert hidden_entries(tmp_path) == []
    assert os.listdir(tmp_path) == ["ckpt"]


def test_overwrite_of_missing_checkpoint_creates_it(tmp_path):
    path = str(tmp_path / "fresh")
    keepax.save(path, make_tree(), overwrite=True)
    assert_same(keepax.restore(path), make_tree())
    assert hidden_entries(tmp_path) == []


class _ArrayRaises:
    def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204
        raise RuntimeError("conversion failed")


def _deleted_array() -> jax.Array:
    x = jnp.arange(4)
    x.delete()
    return x


def _bad_tree(kind: str) -> Any:
    tree = make_tree()
    # "zzz" sorts last: the bad leaf comes after every good one in flatten order.
    tree["zzz"] = {
        "object": object(),
        "array-raises": _ArrayRaises(),
        "deleted-jax-array": _deleted_array() if kind == "deleted-jax-array" else None,
        "object-array": np.array([1, "a", None], dtype=object),
        "string-array": np.array(["abc", "def"]),
    }[kind]
    return tree


@pytest.mark.parametrize(
    "kind", ["object", "array-raises", "deleted-jax-array", "object-array", "string-array"]
)
def test_failed_overwrite_keeps_old_checkpoint(tmp_path, kind):
    path = save(tmp_path, tree={"old": np.arange(10), "v": 1})
    before = file_state(tmp_path)
    with pytest.raises(UnsupportedLeafError) as info:
        keepax.save(path, _bad_tree(kind), overwrite=True)
    assert info.value.leaf == "['zzz']"
    assert file_state(tmp_path) == before
    assert hidden_entries(tmp_path) == []
    assert_same(keepax.restore(path), {"old": np.arange(10), "v": 1})


class _Boom(Exception):
    pass


def _failing_writer_factory(monkeypatch: pytest.MonkeyPatch, after_bytes: int,
                            exc: type[BaseException]) -> None:
    """Makes local data files fail to grow beyond ``after_bytes`` bytes (a storage-level
    fault: the ``Storage``/``Writer`` interface, not a backend's private classes)."""
    from keepax._src.io import LocalStorage

    Faults(fail_write_after=after_bytes,
           write_error=lambda: exc("injected failure")).install(monkeypatch, LocalStorage)


@pytest.mark.parametrize("exc", [_Boom, OSError, KeyboardInterrupt])
@pytest.mark.parametrize("after_bytes", [0, 1000, 300_000])
def test_overwrite_failing_while_writing_keeps_old_checkpoint(tmp_path, monkeypatch, exc,
                                                              after_bytes):
    path = save(tmp_path, tree={"old": np.arange(10), "v": 1})
    before = file_state(tmp_path)
    _failing_writer_factory(monkeypatch, after_bytes, exc)
    with pytest.raises(exc, match="injected"):
        keepax.save(path, make_tree(), overwrite=True)
    monkeypatch.undo()
    assert file_state(tmp_path) == before
    assert hidden_entries(tmp_path) == []
    assert_same(keepax.restore(path), {"old": np.arange(10), "v": 1})


def test_overwrite_failing_at_commit_rename_keeps_old_checkpoint(tmp_path, monkeypatch):
    from keepax._src.io import LocalStorage

    path = save(tmp_path, tree={"old": np.arange(10), "v": 1})
    before = file_state(tmp_path)
    Faults(fail_rename=OSError(28, "No space left on device (injected)")).install(
        monkeypatch, LocalStorage)
    with pytest.raises(OSError, match="injected"):
        keepax.save(path, make_tree(), overwrite=True)
    monkeypatch.undo()
    assert file_state(tmp_path) == before
    assert hidden_entries(tmp_path) == []
    assert_same(keepax.restore(path), {"old": np.arange(10), "v": 1})


def test_save_failing_while_writing_leaves_nothing(tmp_path, monkeypatch):
    _failing_writer_factory(monkeypatch, 1000, _Boom)
    with pytest.raises(_Boom):
        keepax.save(str(tmp_path / "new"), make_tree())
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointNotFoundError):
        keepax.restore(str(tmp_path / "new"))


# ---------------------------------------------------------------------------------------------
# Unsupported leaves and metadata.


def _unsupported(kind: str) -> Any:
    return {
        "object": object(),
        "set": {1, 2, 3},
        "frozenset": frozenset({1}),
        "lambda": lambda x: x,
        "object-array": np.array([object(), object()], dtype=object),
        "string-array": np.array(["abc", "xyz"]),
        "bytes-array": np.array([b"ab"]),
        "datetime-array": np.array(["2024-01-01"], dtype="datetime64[D]"),
        "array-raises": _ArrayRaises(),
        "module": np,
        "type": int,
    }[kind]


@pytest.mark.parametrize(
    "kind",
    ["object", "set", "frozenset", "lambda", "object-array", "string-array", "bytes-array",
     "datetime-array", "array-raises", "module", "type"],
)
def test_unsupported_leaf(tmp_path, kind):
    path = str(tmp_path / "ckpt")
    tree = {"good": np.arange(3), "deep": [1, {"bad": _unsupported(kind)}]}
    with pytest.raises(UnsupportedLeafError) as info:
        keepax.save(path, tree)
    assert isinstance(info.value, TypeError)
    assert info.value.leaf == "['deep'][1]['bad']"
    assert "['deep'][1]['bad']" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_int_leaf_too_large_for_json(tmp_path):
    with pytest.raises(UnsupportedLeafError) as info:
        keepax.save(str(tmp_path / "ckpt"), {"ok": 10**4000, "big": 10**5000})
    assert info.value.leaf == "['big']"
    assert os.listdir(tmp_path) == []


def test_int_leaf_of_any_representable_magnitude(tmp_path):
    tree = {"pos": 10**4000, "neg": -(2**4000), "zero": 0}
    path = save(tmp_path, tree=tree)
    assert keepax.restore(path) == tree


def test_unsupported_dict_key(tmp_path):
    with pytest.raises(UnsupportedLeafError) as info:
        keepax.save(str(tmp_path / "ckpt"), {"a": {object(): 1}})
    assert info.value.leaf == "['a']"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "metadata",
    [{"a": object()}, {"a": np.float32(1.0)}, {"a": np.arange(3)}, {"a": float("nan")},
     {"a": float("inf")}, {"a": {1, 2}}, {("t",): 1}, [1, 2], "meta", b"meta"],
    ids=["object", "np-scalar", "np-array", "nan", "inf", "set", "tuple-key", "list", "str",
         "bytes"],
)
def test_bad_metadata(tmp_path, metadata):
    path = str(tmp_path / "ckpt")
    with pytest.raises(KeepaxError) as info:
        keepax.save(path, make_tree(), metadata=metadata)
    assert path in str(info.value)
    assert os.listdir(tmp_path) == []


def test_bad_metadata_on_overwrite_keeps_old(tmp_path):
    path = save(tmp_path)
    before = file_state(tmp_path)
    with pytest.raises(KeepaxError):
        keepax.save(path, {"x": 1}, metadata={"x": object()}, overwrite=True)
    assert file_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# `like` mismatches.


def _like_tree() -> dict[str, Any]:
    return {
        "a": np.zeros((3,), np.float32),
        "b": np.zeros((2, 2), np.int32),
        "c": "text",
        "d": np.zeros((4,), np.float32),
        "e": np.arange(2, dtype=np.float32),
        "f": 7,
    }


def test_like_mismatches_reported_together(tmp_path):
    path = save(tmp_path, tree=_like_tree())
    like = {
        "a": np.zeros((4,), np.float32),  # wrong shape
        "b": np.zeros((2, 2), np.float32),  # wrong dtype
        "c": np.zeros((1,), np.float32),  # array where a str is stored
        "d": "text",  # str where an array is stored
        # "e" missing from like: extra leaf in the checkpoint
        "f": 7,  # fine
        "z": np.zeros(1),  # not in the checkpoint
    }
    with pytest.raises(TreeMismatchError) as info:
        keepax.restore(path, like=like)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "(6 problems)" in message
    for leaf in ["['a']", "['b']", "['c']", "['d']", "['e']", "['z']"]:
        assert leaf in message
    assert "['f']" not in message
    assert "partial=True" in message and "dtype='like'" in message
    assert info.value.leaf in {"['a']", "['b']", "['c']", "['d']", "['e']", "['z']"}
    assert path in message


def test_like_missing_leaf_even_with_partial(tmp_path):
    path = save(tmp_path, tree=_like_tree())
    like = dict(_like_tree(), z=np.zeros(1))
    with pytest.raises(TreeMismatchError, match=r"\['z'\]: in like but not in the checkpoint"):
        keepax.restore(path, like=like, partial=True)


def test_like_wrong_value_type(tmp_path):
    path = save(tmp_path, tree=_like_tree())
    like = dict(_like_tree(), f="seven", c=3)
    with pytest.raises(TreeMismatchError) as info:
        keepax.restore(path, like=like)
    assert "['f']" in str(info.value) and "['c']" in str(info.value)


def test_like_partial_allows_extra_checkpoint_leaves(tmp_path):
    path = save(tmp_path, tree=_like_tree())
    with pytest.raises(TreeMismatchError, match=r"\['e'\].*partial=True"):
        keepax.restore(path, like={"a": np.zeros(3, np.float32), "c": ""})
    stats = keepax.RestoreStats()
    got = keepax.restore(path, like={"a": np.zeros(3, np.float32), "c": ""}, partial=True,
                         stats=stats)
    assert_same(got, {"a": np.zeros(3, np.float32), "c": "text"})
    assert stats.bytes_read == 12  # only a's bytes


def test_like_dtype_cast(tmp_path):
    tree = {"a": np.array([1.5, -2.25, 3.0], np.float32), "b": np.arange(4, dtype=np.int32)}
    path = save(tmp_path, tree=tree)
    like = {"a": np.zeros(3, np.float16), "b": np.zeros(4, np.int64)}
    with pytest.raises(TreeMismatchError) as info:
        keepax.restore(path, like=like)
    assert "['a']" in str(info.value) and "['b']" in str(info.value)
    got = keepax.restore(path, like=like, dtype="like")
    assert got["a"].dtype == np.float16 and got["b"].dtype == np.int64
    np.testing.assert_array_equal(got["a"], tree["a"].astype(np.float16))
    np.testing.assert_array_equal(got["b"], tree["b"].astype(np.int64))
    jlike = {"a": jax.ShapeDtypeStruct((3,), jnp.bfloat16), "b": jnp.zeros(4, jnp.int32)}
    got = keepax.restore(path, like=jlike, dtype="like")
    assert isinstance(got["a"], jax.Array) and got["a"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["a"], np.float32), tree["a"])
    np.testing.assert_array_equal(np.asarray(got["b"]), tree["b"])


def test_like_cast_does_not_hide_shape_mismatch(tmp_path):
    path = save(tmp_path, tree={"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(TreeMismatchError, match="shape"):
        keepax.restore(path, like={"a": np.zeros((3, 2), np.float16)}, dtype="like")


def test_errors_module_exports():
    for name in errors.__all__:
        obj = getattr(errors, name)
        assert issubclass(obj, Warning) or issubclass(obj, KeepaxError)
    assert sys.modules["keepax.errors"] is errors
