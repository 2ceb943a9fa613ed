"""Fuzzing whole checkpoints: manifests, commit markers, data files, single-file headers and
chunk tables, mutated structurally (hypothesis) and byte by byte, read through the public API.

Every call must yield data or a ``KeepaxError`` (any other exception fails the test), and:

- finish within a generous time bound (``_BUDGET_SECONDS``: only a gross overrun, a hang or a
  quadratic blow-up, fails; the call's own time is typically milliseconds);
- allocate (tracemalloc's peak, which includes NumPy array data) no more than a small constant
  plus a multiple of the checkpoint's real size on disk: a hostile manifest cannot make keepax
  allocate what the files do not hold;
- open no file outside the checkpoint, import nothing and unpickle nothing (a
  ``sys.addaudithook`` sees every ``open``, ``import`` and ``pickle.find_class``).

The default run is bounded (well under a minute); ``KEEPAX_FUZZ_EXAMPLES=N`` runs N examples
per target, randomly seeded (a long mode for soak runs).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_tables import _build

import keepax
from keepax._src.checkpoint.single_file import inspect_file
from keepax._src.format.manifest import CommitMarker, Manifest
from keepax._src.io.local import LocalStorage
from keepax.errors import CorruptCheckpointError, KeepaxError

_EXAMPLES = int(os.environ.get("KEEPAX_FUZZ_EXAMPLES", "0"))
_BUDGET_SECONDS = 5.0
_BUDGET_BYTES = 16 << 20  # plus _BYTES_PER_FILE_BYTE per byte of the checkpoint on disk
_BYTES_PER_FILE_BYTE = 64


def _settings(default: int) -> Any:
    return settings(
        max_examples=_EXAMPLES or default,
        deadline=None,
        derandomize=not _EXAMPLES,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


# ---------------------------------------------------------------------------------------------
# Watching what a call does.


class _Watch:
    """What the audit hook records while armed (``root`` set): events outside ``root``."""

    root: str | None = None
    violations: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    root = _Watch.root
    if root is None:
        return
    if event == "open":
        target = args[0]
        if isinstance(target, int):
            return  # wrapping a descriptor already open
        path = os.path.realpath(os.fsdecode(target))
        if path != root and not path.startswith(root + os.sep):
            _Watch.violations.append(f"opened {path}")
    elif event in ("import", "pickle.find_class", "subprocess.Popen", "os.system"):
        _Watch.violations.append(f"{event} {args[:2]!r:.200}")


sys.addaudithook(_audit)  # cannot be removed: it does nothing unless armed


@pytest.fixture(scope="module", autouse=True)
def _tracing() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _check(call: Callable[[], Any], root: Path) -> None:
    """Runs ``call`` armed; only a KeepaxError may escape; time, memory and files checked."""
    real = os.path.realpath(root)
    limit = _BUDGET_BYTES + _BYTES_PER_FILE_BYTE * _disk_bytes(root)
    _Watch.violations = []
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    began = time.monotonic()
    _Watch.root = real
    try:
        call()
    except KeepaxError:
        pass
    finally:
        _Watch.root = None
    seconds = time.monotonic() - began
    peak = tracemalloc.get_traced_memory()[1] - before
    assert not _Watch.violations, _Watch.violations
    assert seconds < _BUDGET_SECONDS, f"took {seconds:.1f} s"
    assert peak <= limit, f"allocated {peak} bytes for a checkpoint of {_disk_bytes(root)}"


def _directory_calls(path: Path) -> list[Callable[[], Any]]:
    def stream() -> None:
        with_handle = keepax.open(str(path))
        for _ in with_handle.iter_leaves():
            pass

    return [lambda: keepax.inspect(str(path)), lambda: keepax.restore(str(path)),
            lambda: keepax.verify(str(path)), stream]


def _file_calls(path: Path) -> list[Callable[[], Any]]:
    return [lambda: keepax.load_file(path), lambda: inspect_file(path)]


# ---------------------------------------------------------------------------------------------
# Valid checkpoints to start from.


def _tree() -> dict[str, Any]:
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    sharded = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4),
                             NamedSharding(mesh, PartitionSpec("x")))
    return {
        "sharded": sharded,
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "bf16": jnp.ones(3, jnp.bfloat16),
        "key": jax.random.key(7),
        "raw": b"bytes",
        "empty": np.zeros((0, 3), np.float32),
        "values": [1, 2.5, True, 1 + 2j, "str", None],
        "scalar": np.float64(2.5),
    }


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A directory checkpoint, a single file and a 1.1 checkpoint with chunk tables, each
    read once here (unwatched) so that lazy imports and caches are warm."""
    base = tmp_path_factory.mktemp("fuzz-bases")
    keepax.save(str(base / "dir" / "ckpt"), _tree(), metadata={"step": 3})
    # Compressed (zstd chunks; "zeros" is the last chunk of its data file).
    keepax.save(str(base / "zdir" / "ckpt"), {**_tree(), "zeros": np.zeros(4096, np.float32)},
                compression="zstd")
    # Compressed and byte-shuffled (one zstd-shuffle chunk, the only one of its file).
    tokens = np.random.default_rng(0).integers(0, 50_000, (64, 512)).astype(np.int32)
    keepax.save(str(base / "sdir" / "ckpt"), {"tokens": tokens}, compression="zstd")
    keepax.save_file(base / "file" / "fit.keepax", _tree(), metadata={"phase": 1})
    (base / "tables").mkdir()
    _build(LocalStorage(str(base / "tables")), "ckpt")  # type: ignore[arg-type]
    for call in _directory_calls(base / "dir" / "ckpt") + _directory_calls(
        base / "tables" / "ckpt"
    ) + _directory_calls(base / "zdir" / "ckpt") + _directory_calls(
        base / "sdir" / "ckpt"
    ) + _file_calls(base / "file" / "fit.keepax"):
        call()
    try:  # warm the error paths too (their messages import nothing later)
        keepax.restore(str(base / "missing"))
    except KeepaxError:
        pass
    return {"dir": base / "dir", "file": base / "file", "tables": base / "tables",
            "zdir": base / "zdir", "sdir": base / "sdir"}


@pytest.fixture
def scratch() -> Iterator[Callable[[Path], Path]]:
    """Copies a base into a fresh directory per example."""
    made: list[str] = []

    def copy_of(base: Path) -> Path:
        target = Path(tempfile.mkdtemp(prefix="keepax-fuzz-")) / "root"
        made.append(str(target.parent))
        shutil.copytree(base, target)
        return target

    yield copy_of
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Structural mutations of JSON documents.

SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**32 - 1, 2**32, 2**48, 2**48 + 1, 2**63, 2**64,
                10**12, 10**309, -(10**309)]
SPECIAL_STRINGS = [
    "1.0", "1.1", "1.2", "1.9", "2.0", "0.9", "01.0", ",3", "04", "f4,f4", "<U5", "O", "V4",
    "float32", "bfloat16", "int4", "uint32", "complex32", "keepax", "keepax-file", "raw",
    "zstd", "xxh3-128:" + "0" * 32, "xxh3-128:XYZ", "data/p00000-000.safetensors",
    "data/p00000-chunks.json", "data/../manifest.json", "../../etc/passwd", "/etc/passwd",
    "data/p00000-000.safetensors/../../x.safetensors", "numpy", "jax", "prngkey", "int",
    "float", "str", "3fe0000000000000", "threefry2x32", "", "leaf", "dict", "node",
    "0", "4294967295", "99999999999",
]
KNOWN_KEYS = [
    "format", "version", "files", "leaves", "tree", "name", "nbytes", "path", "type", "shape",
    "dtype", "chunks", "file", "offset", "start", "crc32c", "value", "impl", "metadata",
    "writer", "created", "committed", "manifest_nbytes", "manifest_crc32c", "k", "i", "c",
    "keys", "codec", "stored_nbytes", "digest", "cells", "block", "layout", "rotation",
    "tables", "layouts", "grid", "writers", "process", "shared", "kind", "__metadata__",
    "format_version", "manifest", "data_offsets",
]
TARGETED: dict[str, list[Any]] = {
    # Values found to break readers before (issue 12), aimed at the fields they broke.
    "dtype": [",3", "04", "f4,f4", "(2,)i4", "complex32", "float128", "O"],
    "created": [10**309, float("inf"), -1, 10**20],
    "committed": [10**309, float("inf"), -(10**309)],
    "codec": ["zstd", 3, None],
    "digest": ["xxh3-128:Z", "md5:" + "0" * 32, 7],
    "stored_nbytes": [0, 10**12, -1],
    "name": ["../../etc/passwd", "data/../x.safetensors", "/etc/passwd", "data/p1-000.json"],
    "version": ["1.2", "1.9", "2.0", "0.1"],
    "format_version": ["2.0", "0.1", "1.9"],
    "manifest_crc32c": ["99999999999", 2**64],
    "offset": [0, 2**63, 10**309],
    "shape": [[2**48] * 3, [10**6] * 8, []],
}
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from(SPECIAL_INTS)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(SPECIAL_STRINGS)
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)


def _places(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            _places(v, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            _places(v, out)
    return out


def _mutate(data: st.DataObject, doc: Any) -> Any:
    """Applies 1 to 4 structural mutations to a JSON document."""
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        places = _places(doc, [])
        if not places:
            return data.draw(_values, label="root")
        parent, key = places[data.draw(st.integers(0, len(places) - 1), label="where")]
        op = data.draw(st.sampled_from(["delete", "replace", "special", "special", "delta",
                                        "duplicate", "add", "swap", "scale", "targeted"]),
                       label="op")
        value = parent[key]
        if op == "targeted":  # a hostile value in one of the fields it aims at
            fields = [(p, k) for p, k in places if k in TARGETED]
            if fields:
                parent, key = fields[data.draw(st.integers(0, len(fields) - 1), label="field")]
                parent[key] = data.draw(st.sampled_from(TARGETED[key]), label="hostile")
        elif op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(_values, label="value")
        elif op == "special":
            pool = SPECIAL_STRINGS if isinstance(value, str) else SPECIAL_INTS
            parent[key] = data.draw(st.sampled_from(pool), label="special")
        elif op == "delta":
            base = value if type(value) is int else 0
            parent[key] = base + data.draw(st.integers(-70, 70), label="delta")
        elif op == "scale" and type(value) is int:
            parent[key] = value * data.draw(st.sampled_from([0, 2, 1000, 2**40]), label="x")
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(value))
        elif op == "add" and isinstance(value, dict):
            value[data.draw(st.sampled_from(KNOWN_KEYS), label="key")] = data.draw(_values)
        elif op == "swap":
            other, other_key = places[data.draw(st.integers(0, len(places) - 1), label="with")]
            try:
                parent[key], other[other_key] = copy.deepcopy(other[other_key]), value
            except (KeyError, IndexError):
                pass
    return doc


def _encode(doc: Any) -> bytes:
    return json.dumps(doc).replace("Infinity", "1e400").encode()


def _write_signed(ckpt: Path, manifest: bytes, *, sign: bool = True) -> None:
    """Writes a manifest and (``sign``) a marker whose size and CRC match it, so that the
    damage reaches the manifest's own validation."""
    (ckpt / "manifest.json").write_bytes(manifest)
    if sign:
        marker = json.loads((ckpt / "keepax.commit").read_bytes())
        marker.update(manifest_nbytes=len(manifest), manifest_crc32c=crc32c.crc32c(manifest))
        (ckpt / "keepax.commit").write_text(json.dumps(marker))


# ---------------------------------------------------------------------------------------------
# Targets.


@_settings(120)
@given(data=st.data(), sign=st.booleans(), base=st.sampled_from(["dir", "zdir", "sdir"]))
def test_fuzz_directory_manifest(bases, scratch, data, sign, base) -> None:
    root = scratch(bases[base])
    ckpt = root / "ckpt"
    doc = _mutate(data, json.loads((ckpt / "manifest.json").read_bytes()))
    _write_signed(ckpt, _encode(doc), sign=sign or data.draw(st.booleans(), label="resign"))
    for call in _directory_calls(ckpt):
        _check(call, root)


@_settings(60)
@given(data=st.data())
def test_fuzz_commit_marker(bases, scratch, data) -> None:
    root = scratch(bases["dir"])
    ckpt = root / "ckpt"
    doc = _mutate(data, json.loads((ckpt / "keepax.commit").read_bytes()))
    (ckpt / "keepax.commit").write_bytes(_encode(doc))
    for call in _directory_calls(ckpt)[:3]:
        _check(call, root)


def _damage(data: st.DataObject, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        action = data.draw(st.sampled_from(["truncate", "set", "insert", "delete", "extend"]))
        i = data.draw(st.integers(0, max(0, len(out) - 1)), label="at")
        byte = data.draw(st.integers(0, 255), label="byte")
        if action == "truncate":
            del out[i:]
        elif action == "set" and out:
            out[i] = byte
        elif action == "insert":
            out.insert(i, byte)
        elif action == "delete" and out:
            del out[i]
        elif action == "extend":
            out += bytes([byte]) * data.draw(st.integers(1, 100), label="n")
    return bytes(out)


@_settings(60)
@given(data=st.data(), which=st.sampled_from(["keepax.commit", "manifest.json", "data"]))
def test_fuzz_directory_bytes(bases, scratch, data, which) -> None:
    root = scratch(bases["dir"])
    ckpt = root / "ckpt"
    target = next((ckpt / "data").iterdir()) if which == "data" else ckpt / which
    target.write_bytes(_damage(data, target.read_bytes()))
    for call in _directory_calls(ckpt):
        _check(call, root)


def _with_plane(stored: bytes, count: int, which: int, plane: bytes) -> bytes:
    """A zstd-shuffle chunk's stored bytes (``count`` planes) with plane ``which`` replaced."""
    sizes = list(struct.unpack(f"<{count}I", stored[: 4 * count]))
    begin = 4 * count + sum(sizes[:which])
    body = stored[begin + sizes[which] :]
    sizes[which] = len(plane)
    return struct.pack(f"<{count}I", *sizes) + stored[4 * count : begin] + plane + body


@_settings(60)
@given(data=st.data(), kind=st.sampled_from(["damaged", "bomb", "short", "garbage"]),
       which=st.sampled_from([("zdir", "['zeros']", "zstd"),
                              ("sdir", "['tokens']", "zstd-shuffle")]))
def test_fuzz_compressed_chunk(bases, scratch, data, kind, which) -> None:
    """A zstd or zstd-shuffle chunk's stored bytes replaced (damaged, a frame or plane frame of
    more or fewer bytes than its logical size, garbage) with the manifest re-signed to match:
    decoding must refuse it."""
    base, path, codec = which
    root = scratch(bases[base])
    ckpt = root / "ckpt"
    doc = json.loads((ckpt / "manifest.json").read_bytes())
    leaf = next(x for x in doc["leaves"] if x["path"] == path)
    chunk = leaf["chunks"][0]
    assert chunk["codec"] == codec
    file = ckpt / doc["files"][chunk["file"]]["name"]
    raw = file.read_bytes()
    assert chunk["offset"] + chunk["stored_nbytes"] == len(raw)
    stored = raw[chunk["offset"]:]
    if kind == "damaged":
        new = _damage(data, stored)
    elif kind == "garbage":
        new = data.draw(st.binary(min_size=1, max_size=200), label="garbage")
    else:
        # A zstd chunk's frame, or one plane frame of a zstd-shuffle chunk (docs/FORMAT.md
        # §5.4.2: a table of u32 plane sizes, then the planes), of more or fewer bytes.
        planes = 4 if codec == "zstd-shuffle" else 0
        size = chunk["nbytes"] // planes if planes else chunk["nbytes"]
        n = size * data.draw(st.integers(2, 64)) if kind == "bomb" else (
            data.draw(st.integers(0, size - 1), label="n"))
        new = zstandard.ZstdCompressor(write_content_size=data.draw(st.booleans())).compress(
            bytes(n))
        if planes:
            new = _with_plane(stored, planes, data.draw(st.integers(0, planes - 1)), new)
    if not new:
        new = b"\0"
    file.write_bytes(raw[: chunk["offset"]] + new)
    chunk.update(stored_nbytes=len(new), crc32c=crc32c.crc32c(new))
    doc["files"][chunk["file"]]["nbytes"] = chunk["offset"] + len(new)
    _write_signed(ckpt, _encode(doc))
    if kind in ("bomb", "short"):
        with pytest.raises(CorruptCheckpointError, match="decompresses to") as info:
            keepax.restore(str(ckpt))
        assert info.value.leaf == path
    for call in _directory_calls(ckpt):
        _check(call, root)


def _read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


@_settings(120)
@given(data=st.data(), part=st.sampled_from(["header", "manifest", "bytes"]))
def test_fuzz_single_file(bases, scratch, data, part) -> None:
    root = scratch(bases["file"])
    path = root / "fit.keepax"
    if part == "bytes":
        path.write_bytes(_damage(data, path.read_bytes()))
    else:
        header, body = _read_header(path)
        if part == "manifest":  # mutate the embedded manifest and re-sign it
            manifest = _encode(_mutate(data, json.loads(header["__metadata__"]["manifest"])))
            header["__metadata__"]["manifest"] = manifest.decode()
            header["__metadata__"]["manifest_crc32c"] = str(crc32c.crc32c(manifest))
        else:
            header = _mutate(data, header)
        text = _encode(header)
        keep_length = data.draw(st.booleans(), label="keep length")
        old = len(path.read_bytes()) - len(body) - 8
        length = old if keep_length and len(text) <= old else len(text)
        path.write_bytes(struct.pack("<Q", length) + text.ljust(length) + body)
    for call in _file_calls(path):
        _check(call, root)


@_settings(80)
@given(data=st.data(), which=st.sampled_from(["table", "manifest"]))
def test_fuzz_chunk_tables(bases, scratch, data, which) -> None:
    root = scratch(bases["tables"])
    ckpt = root / "ckpt"
    manifest = json.loads((ckpt / "manifest.json").read_bytes())
    if which == "table":  # mutate a table and record its new size and CRC in the manifest
        ref = data.draw(st.sampled_from(manifest["tables"]), label="table")
        table = _encode(_mutate(data, json.loads((ckpt / ref["name"]).read_bytes())))
        (ckpt / ref["name"]).write_bytes(table)
        ref.update(nbytes=len(table), crc32c=crc32c.crc32c(table))
    else:
        manifest = _mutate(data, manifest)
    _write_signed(ckpt, _encode(manifest))
    for call in _directory_calls(ckpt):
        _check(call, root)


# ---------------------------------------------------------------------------------------------
# The watch itself works (else the targets above would prove nothing).


def test_the_watch_sees_outside_opens_and_big_allocations(tmp_path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    with pytest.raises(AssertionError, match="opened"):
        _check(lambda: open(tmp_path / "outside", "w").close(), inside)
    with pytest.raises(AssertionError, match="allocated"):
        _check(lambda: np.ones(_BUDGET_BYTES // 8 + (1 << 20)), inside)
    with pytest.raises(ValueError):
        _check(lambda: int("x"), inside)
    _check(lambda: (inside / "ok").write_bytes(b"fine"), inside)


@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le", "utf-32-be", "utf-32-le"])
def test_json_in_other_encodings_is_damage(bases, scratch, encoding) -> None:
    """Found by a long run: ``json.loads`` of bytes detects UTF-16/32 and imports the codec
    (the first time, an import and an open outside the checkpoint). The format is UTF-8 only:
    such a marker or manifest is damage, decoded by nothing else."""
    root = scratch(bases["dir"])
    ckpt = root / "ckpt"
    for name, parse in (("keepax.commit", CommitMarker.from_json),
                        ("manifest.json", Manifest.from_json)):
        data = (ckpt / name).read_text().encode(encoding)
        with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
            parse(data, where=str(ckpt))
        (ckpt / name).write_bytes(data)
        for call in _directory_calls(ckpt)[:3]:
            _check(call, root)
