"""Unit tests of ``keepax._src.format.manifest``: serialisation round trips, validation of untrusted
manifests and commit markers, and a fuzz test that only keepax errors ever come out."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import keepax
from keepax._src.format import datafiles as fmt
from keepax._src.format import dtypes
from keepax._src.format.manifest import (
    ARRAY_TYPES,
    FORMAT_VERSION,
    VALUE_TYPES,
    ArrayLeaf,
    Chunk,
    CommitMarker,
    DataFile,
    Manifest,
    ValueLeaf,
)
from keepax.errors import CorruptCheckpointError, FormatVersionError

WHERE = "some/where/ckpt"
ALLOWED = (CorruptCheckpointError, FormatVersionError)


def hand_made() -> Manifest:
    f0 = DataFile("data/p00000-000.safetensors", 64 + 48 + 4 + 8)
    f1 = DataFile("data/p00000-001.safetensors", 64 + 16)
    tree = {
        "k": "dict",
        "keys": ["a", "b", "k", "n", "s", {"int": 3}],
        "c": [
            {"k": "leaf", "i": 0},
            {"k": "leaf", "i": 1},
            {"k": "leaf", "i": 2},
            {"k": "none"},
            {"k": "leaf", "i": 3},
            {"k": "tuple", "c": [{"k": "leaf", "i": 4}, {"k": "leaf", "i": 5}]},
        ],
    }
    leaves = (
        ArrayLeaf(
            "['a']", "jax", (4, 4), "float32",
            (Chunk(0, 64, 32, (0, 0), (2, 4), 11), Chunk(1, 64, 16, (2, 0), (1, 4), 12),
             Chunk(0, 96, 16, (3, 0), (1, 4), 13)),
            sharding={"kind": "named", "mesh": {"x": 2}, "spec": ["x", None]},
        ),
        ArrayLeaf("['b']", "numpy", (2,), "bfloat16", (Chunk(0, 112, 4, (0,), (2,), 0),)),
        ArrayLeaf("['k']", "prngkey", (2,), "uint32", (Chunk(0, 116, 8, (0,), (2,), 2**32 - 1),),
                  impl="threefry2x32"),
        ValueLeaf("['s']", "str", "h\u00e9llo \"\x00\""),
        ValueLeaf("[3][0]", "int", -(10**30)),
        ArrayLeaf("[3][1]", "numpy", (0, 5), "int4", ()),
    )
    # f0 holds 32 + 16 + 4 + 8 = 60 bytes after a 64-byte header; f1 holds 16.
    return Manifest(
        version=FORMAT_VERSION,
        tree=tree,
        leaves=leaves,
        files=(f0, f1),
        metadata={"loss": 0.25, "nested": {"list": [1, "two", None, True]}},
        created=1234.5,
        writer={"keepax": "0.1.0", "process_count": 1},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, bytes]:
    """The manifest and marker bytes of a real checkpoint with every leaf kind and a sharded
    leaf split into several chunks."""
    devices = np.array(jax.devices()[:4])
    mesh = Mesh(devices, ("x",))
    sharded = jax.device_put(
        jnp.arange(64, dtype=jnp.float32).reshape(8, 8), NamedSharding(mesh, PartitionSpec("x"))
    )
    tree = {
        "sharded": sharded,
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalar": np.float64(2.5),
        "key": jax.random.key(7),
        "raw": b"bytes",
        "empty": np.zeros((0, 3), np.float32),
        "values": [1, 2.5, True, 1 + 2j, "str", None],
        "keys": {(1, "t"): {"inner": jnp.ones(3, jnp.bfloat16)}, (2, None): 1.5},
        "ints": {1: np.int8(1), 2: np.ones(2, np.uint8)},
    }
    path = str(tmp_path_factory.mktemp("manifest") / "ckpt")
    keepax.save(path, tree, metadata={"step": 3})
    with open(f"{path}/manifest.json", "rb") as f:
        manifest = f.read()
    with open(f"{path}/keepax.commit", "rb") as f:
        marker = f.read()
    return manifest, marker


# ---------------------------------------------------------------------------------------------
# Round trips.


def test_manifest_round_trip_hand_made():
    m = hand_made()
    data = m.to_json()
    assert isinstance(data, bytes)
    back = Manifest.from_json(data, where=WHERE)
    assert back == m
    assert back.to_json() == data
    json.loads(data)  # plain JSON


def test_manifest_round_trip_real(saved):
    data, _ = saved
    m = Manifest.from_json(data, where=WHERE)
    assert m.to_json() == data  # byte for byte: canonical, compact
    assert m.version == FORMAT_VERSION
    assert m.metadata == {"step": 3}
    sharded = [x for x in m.leaves if x.path == "['sharded']"]
    assert len(sharded) == 1 and len(sharded[0].chunks) == 4
    assert sharded[0].sharding["kind"] == "named"
    (key,) = [x for x in m.leaves if x.path == "['key']"]
    assert key.type == "prngkey" and key.impl == "threefry2x32" and key.dtype == "uint32"
    (empty,) = [x for x in m.leaves if x.path == "['empty']"]
    assert empty.chunks == () and empty.shape == (0, 3)


def test_manifest_to_json_is_compact_and_ordered():
    data = hand_made().to_json()
    assert data == json.dumps(json.loads(data), separators=(",", ":")).encode()  # compact
    assert data.isascii()
    assert list(json.loads(data)) == [
        "format", "version", "created", "writer", "metadata", "files", "tree", "leaves"
    ]
    assert data.startswith(b'{"format":"keepax","version":"1.0",')


def test_manifest_to_json_rejects_nan():
    m = hand_made()
    bad = Manifest(m.version, m.tree, m.leaves, m.files, {"x": float("nan")}, m.created, m.writer)
    with pytest.raises(ValueError):
        bad.to_json()


def test_commit_marker_round_trip(saved):
    marker = CommitMarker((1, 0), 771, 2**32 - 1, 1795368773.769051)
    data = marker.to_json()
    assert CommitMarker.from_json(data, where=WHERE) == marker
    assert json.loads(data) == {
        "format": "keepax",
        "version": "1.0",
        "manifest_nbytes": 771,
        "manifest_crc32c": 2**32 - 1,
        "committed": 1795368773.769051,
    }
    _, real = saved
    parsed = CommitMarker.from_json(real, where=WHERE)
    assert parsed.to_json() == real
    assert parsed.manifest_nbytes == len(saved[0])


def test_commit_marker_integer_time_and_newer_minor():
    data = b'{"format":"keepax","version":"1.9","manifest_nbytes":0,"manifest_crc32c":0,' \
           b'"committed":5,"future":[1]}'
    m = CommitMarker.from_json(data, where=WHERE)
    assert m.version == (1, 9) and m.committed == 5.0 and isinstance(m.committed, float)


# ---------------------------------------------------------------------------------------------
# Validation: targeted cases.


def _doc() -> dict[str, Any]:
    return json.loads(hand_made().to_json())


def _parse(doc: Any) -> Manifest:
    return Manifest.from_json(json.dumps(doc).encode(), where=WHERE)


@pytest.mark.parametrize("version", ["1.0", "1.7", "1.999999", "1.123456"])
def test_accepted_versions(version):
    doc = _doc()
    doc["version"] = version
    assert _parse(doc).version == (1, int(version.split(".")[1]))


@pytest.mark.parametrize("version", ["2.0", "3.1", "999999.0", "10.0"])
def test_newer_major_versions(version):
    doc = _doc()
    doc["version"] = version
    doc["leaves"] = "future layout"  # must not matter: the version is checked first
    with pytest.raises(FormatVersionError, match="upgrade keepax") as info:
        _parse(doc)
    assert info.value.path == WHERE
    assert version in str(info.value)


@pytest.mark.parametrize(
    "version",
    ["1", "1.", ".0", "1.0.0", "v1.0", " 1.0", "1.0 ", "1.0\n", "1,0", "1234567.0",
     "1.1234567", "\u0661.\u0660", "1.0\x00", "", "-1.0", "+1.0", "1e0", 1.0, 1, None, ["1.0"]],
)
def test_invalid_versions(version):
    doc = _doc()
    doc["version"] = version
    with pytest.raises(CorruptCheckpointError) as info:
        _parse(doc)
    assert info.value.path == WHERE


@pytest.mark.parametrize("version", ["0.0", "0.9"])
def test_major_zero_rejected(version):
    doc = _doc()
    doc["version"] = version
    with pytest.raises(ALLOWED):
        _parse(doc)


@pytest.mark.parametrize("fmt", ["orbax", "Keepax", "keepax ", "", None, 1])
def test_format_name(fmt):
    doc = _doc()
    doc["format"] = fmt
    with pytest.raises(CorruptCheckpointError):
        _parse(doc)


@pytest.mark.parametrize(
    "name",
    ["data/p00001-000.safetensors", "data/a.safetensors", "data/A_b-c.d.safetensors",
     "data/" + "a" * 128 + ".safetensors", "data/1.2.3.safetensors"],
)
def test_accepted_file_names(name):
    doc = _doc()
    doc["files"][1]["name"] = name
    assert _parse(doc).files[1].name == name


@pytest.mark.parametrize(
    "name",
    ["data/.x.safetensors", "data/..safetensors", "data/../x.safetensors",
     "data/a..b.safetensors", "../x.safetensors",
     "/data/x.safetensors", "/etc/passwd", "data/x.safetensors\n", "data/x.safetensors\x00",
     "data/x.safetensor", "data/sub/x.safetensors", "data\\x.safetensors", "x.safetensors",
     "data/.safetensors", "data/" + "a" * 129 + ".safetensors", "data/é.safetensors",
     "data/a b.safetensors", "DATA/x.safetensors", "", None, 3, ["data/x.safetensors"]],
)
def test_rejected_file_names(name):
    doc = _doc()
    doc["files"][1]["name"] = name
    with pytest.raises(CorruptCheckpointError):
        _parse(doc)


# FORMAT.md 6: the dtype names version 1.0 defines, with their itemsizes.
SPEC_DTYPES = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8, "complex128": 16, "float8_e3m4": 1,
    "float8_e4m3": 1, "float8_e4m3fnuz": 1, "float8_e4m3b11fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float6_e2m3fn": 1, "float6_e3m2fn": 1, "float4_e2m1fn": 1,
    "int1": 1, "uint1": 1, "int2": 1, "uint2": 1, "int4": 1, "uint4": 1,
}


def _one_leaf_doc(dtype: Any, itemsize: int) -> dict[str, Any]:
    """A manifest with one array leaf of 2 elements whose sizes fit ``itemsize``."""
    return {
        "format": "keepax", "version": "1.0",
        "files": [{"name": "data/p00000-000.safetensors", "nbytes": 64 + 2 * itemsize}],
        "tree": {"k": "leaf", "i": 0},
        "leaves": [{"path": "", "type": "numpy", "shape": [2], "dtype": dtype, "chunks": [
            {"file": 0, "offset": 64, "nbytes": 2 * itemsize, "start": [0], "shape": [2],
             "crc32c": 0}]}],
    }


@pytest.mark.parametrize(("name", "itemsize"), SPEC_DTYPES.items())
def test_spec_dtype_names_accepted(name, itemsize):
    m = _parse(_one_leaf_doc(name, itemsize))
    assert m.leaves[0].dtype == name
    assert dtypes.dtype_from_name(name).itemsize == itemsize
    assert m.leaves[0].nbytes == 2 * itemsize


@pytest.mark.parametrize(
    ("name", "itemsize"),
    [("object", 8), ("O", 8), ("finfo", 8), ("iinfo", 8), ("__name__", 8), ("__class__", 8),
     ("__version__", 8), ("float128", 16), ("complex256", 32), ("longdouble", 16), ("f4", 4),
     ("<f4", 4), (">f4", 4), ("float32 ", 4), ("Float32", 4), ("float", 8), ("int", 8),
     ("double", 8), ("half", 2), ("V4", 4), ("void32", 4), ("S4", 4), ("U1", 4), ("str", 8),
     ("datetime64[s]", 8), ("timedelta64", 8), ("f4,f4", 8), ("bfloat16\x00", 2), ("", 1),
     (None, 1), (4, 4), (["float32"], 4), ("float32" * 20, 4)],
)
def test_unknown_dtype_names_rejected(name, itemsize):
    with pytest.raises(CorruptCheckpointError) as info:
        _parse(_one_leaf_doc(name, itemsize))
    assert info.value.leaf == ""


def test_duplicate_file_names_rejected():
    doc = _doc()
    doc["files"][1]["name"] = doc["files"][0]["name"]
    with pytest.raises(CorruptCheckpointError):
        _parse(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["leaves"][0].update(shape=[4, 2**60]),
        lambda d: d["leaves"][0].update(shape=[4] * 65),
        lambda d: d["leaves"][0].update(shape=[4, -4]),
        lambda d: d["leaves"][0].update(shape=[4, 4.0]),
        lambda d: d["leaves"][0].update(shape=[4, True]),
        lambda d: d["leaves"][0]["chunks"][0].update(offset=-1),
        lambda d: d["leaves"][0]["chunks"][0].update(nbytes=33),
        lambda d: d["leaves"][0]["chunks"][0].update(file=2),
        lambda d: d["leaves"][0]["chunks"][0].update(start=[0]),
        lambda d: d["leaves"][0]["chunks"][0].update(start=[3, 0]),
        lambda d: d["leaves"][0]["chunks"][0].update(crc32c="11"),
        lambda d: d["leaves"][0]["chunks"][0].pop("start"),
        lambda d: d["leaves"][0]["chunks"].pop(),
        lambda d: d["leaves"][0]["chunks"].append(d["leaves"][0]["chunks"][0]),
        lambda d: d["leaves"][0].update(dtype="float64"),
        lambda d: d["leaves"][0].update(dtype="object"),
        lambda d: d["leaves"][0].update(type="pickle"),
        lambda d: d["leaves"][2].pop("impl"),
        lambda d: d["leaves"][3].pop("value"),
        lambda d: d["files"][0].update(nbytes=100),
        lambda d: d["files"].pop(),
        lambda d: d.update(tree=[]),
        lambda d: d.update(metadata=None),
        lambda d: d.update(writer=[]),
        lambda d: d.update(created="now"),
        lambda d: d.update(leaves=None),
        lambda d: d.pop("files"),
    ],
)
def test_rejected_manifests(mutate):
    doc = _doc()
    mutate(doc)
    with pytest.raises(CorruptCheckpointError) as info:
        _parse(doc)
    assert info.value.path == WHERE
    assert WHERE in str(info.value)


def test_overlapping_chunks_rejected():
    # FORMAT.md 5.5 rules 5 and 6.
    doc = _doc()
    doc["leaves"][0]["chunks"][2]["start"] = [1, 0]  # rows 0-1 and row 1: overlap, row 3 missed
    with pytest.raises(CorruptCheckpointError):
        _parse(doc)
    doc = _doc()
    doc["leaves"][1]["chunks"][0]["offset"] = 64  # same bytes as a's first chunk
    with pytest.raises(CorruptCheckpointError):
        _parse(doc)


def test_unknown_members_ignored():
    doc = _doc()
    doc["future"] = {"x": 1}
    doc["files"][0]["future"] = 1
    doc["leaves"][0]["future"] = [1]
    doc["leaves"][0]["chunks"][0]["future"] = None
    doc["leaves"][3]["future"] = "x"
    assert _parse(doc) == hand_made()


@pytest.mark.parametrize(
    "data",
    [
        hand_made().to_json().replace(b'"created":1234.5', b'"created":NaN'),
        hand_made().to_json().replace(b'"created":1234.5', b'"created":-Infinity'),
        hand_made().to_json().replace(b'"created":1234.5', b'"created":' + b"9" * 5000),
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b"\xef\xbb\xbf{}",
        b"\xff\xfe{\x00}\x00",
        b"",
        b"\x00",
        b"{} {}",
        b'"\\ud800"',
    ],
    ids=["nan", "infinity", "huge-int", "deep-list", "deep-object", "bom", "utf16", "empty",
         "nul", "two-docs", "lone-surrogate"],
)
@pytest.mark.parametrize("cls", [Manifest, CommitMarker])
def test_invalid_json(cls, data):
    with pytest.raises(CorruptCheckpointError) as info:
        cls.from_json(data, where=WHERE)
    assert info.value.path == WHERE


@pytest.mark.parametrize(
    "doc",
    [
        {},
        [],
        {"format": "keepax", "version": "1.0"},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": -1, "manifest_crc32c": 0,
         "committed": 0},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": 1.0, "manifest_crc32c": 0,
         "committed": 0},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": True, "manifest_crc32c": 0,
         "committed": 0},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": 1, "manifest_crc32c": "0",
         "committed": 0},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": 1, "manifest_crc32c": 0,
         "committed": "now"},
        {"format": "keepax", "version": "1.0", "manifest_nbytes": 1, "manifest_crc32c": 0},
    ],
)
def test_invalid_commit_markers(doc):
    with pytest.raises(CorruptCheckpointError):
        CommitMarker.from_json(json.dumps(doc).encode(), where=WHERE)


def test_commit_marker_newer_major():
    data = b'{"format":"keepax","version":"2.0","layout":"new"}'
    with pytest.raises(FormatVersionError, match="upgrade keepax"):
        CommitMarker.from_json(data, where=WHERE)


# ---------------------------------------------------------------------------------------------
# Fuzzing: only CorruptCheckpointError / FormatVersionError, and accepted means valid.

SPECIAL_INTS = [0, 1, -1, 2, 3, 64, 2**31, 2**32 - 1, 2**32, 2**48, 2**48 + 1, 2**53 + 1,
                2**63, 2**64, 10**12, -(10**12), 10**100]
SPECIAL_STRINGS = [
    "1.0", "1.7", "2.0", "0.9", "01.0", "1.0\n", "keepax", "float32", "bfloat16", "int4",
    "uint32", "object", "<U5", "O", "finfo", "iinfo", "__name__", "__class__", "V4",
    "data/p00000-000.safetensors", "data/p00000-001.safetensors", "data/../x.safetensors",
    "/etc/passwd", "numpy", "jax", "npscalar", "bytes", "prngkey", "int", "float", "bool",
    "complex", "str", "3fe0000000000000", "threefry2x32", "nonsense", "", "leaf", "dict",
    "tuple", "none", "['a']",
]
KNOWN_KEYS = ["format", "version", "files", "leaves", "tree", "name", "nbytes", "path", "type",
              "shape", "dtype", "chunks", "file", "offset", "start", "crc32c", "value", "impl",
              "metadata", "writer", "created", "sharding", "k", "i", "c", "keys",
              "manifest_nbytes", "manifest_crc32c", "committed"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from(SPECIAL_INTS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(SPECIAL_STRINGS)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _locations(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            _locations(v, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            _locations(v, out)
    return out


def _mutate(data: st.DataObject, doc: Any) -> Any:
    """Applies 1-4 random mutations to a JSON document (in place where possible)."""
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        places = _locations(doc, [])
        if not places:
            return data.draw(json_values, label="root")
        parent, key = places[data.draw(st.integers(0, len(places) - 1), label="where")]
        op = data.draw(
            st.sampled_from(["delete", "replace", "special", "special", "int", "duplicate",
                             "add", "swap"]),
            label="op",
        )
        value = parent[key]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(json_values, label="value")
        elif op == "special":  # a same-kind value that is likely to be interesting
            pool = SPECIAL_STRINGS if isinstance(value, str) else SPECIAL_INTS
            parent[key] = data.draw(st.sampled_from(pool), label="special")
        elif op == "int":
            base = value if type(value) is int else 0
            delta = data.draw(st.sampled_from(SPECIAL_INTS) | st.integers(-100, 100), label="d")
            parent[key] = base + delta
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(value))
        elif op == "add" and isinstance(value, dict):
            value[data.draw(st.sampled_from(KNOWN_KEYS), label="key")] = data.draw(json_values)
        elif op == "swap":
            other_parent, other_key = places[data.draw(st.integers(0, len(places) - 1))]
            try:
                parent[key], other_parent[other_key] = copy.deepcopy(other_parent[other_key]), \
                    copy.deepcopy(value)
            except (KeyError, IndexError):
                pass  # the other place vanished with this one
    return doc


def _check_valid(m: Manifest) -> None:
    """What an accepted manifest guarantees (FORMAT.md 5.5 rules 1-6)."""
    assert isinstance(m, Manifest)
    assert m.version[0] == FORMAT_VERSION[0]
    assert isinstance(m.tree, dict) and isinstance(m.metadata, dict)
    assert isinstance(m.writer, dict) and isinstance(m.created, float)
    names = [f.name for f in m.files]
    assert len(set(names)) == len(names)
    for f in m.files:
        assert re.fullmatch(r"data/[A-Za-z0-9_.-]{1,128}\.safetensors", f.name)
        assert ".." not in f.name
        assert type(f.nbytes) is int and f.nbytes >= 0
    ranges: dict[int, list[tuple[int, int]]] = {}
    for leaf in m.leaves:
        assert isinstance(leaf.path, str)
        if isinstance(leaf, ValueLeaf):
            assert leaf.type in VALUE_TYPES
            continue
        assert isinstance(leaf, ArrayLeaf) and leaf.type in ARRAY_TYPES
        assert len(leaf.shape) <= 64 and all(type(d) is int and d >= 0 for d in leaf.shape)
        itemsize = dtypes.dtype_from_name(leaf.dtype).itemsize
        if leaf.type == "prngkey":
            assert isinstance(leaf.impl, str)
        volume = 0
        cells: set[tuple[int, ...]] = set()
        for c in leaf.chunks:
            assert 0 <= c.file < len(m.files)
            assert 0 <= c.offset and c.offset + c.nbytes <= m.files[c.file].nbytes
            assert len(c.start) == len(c.shape) == len(leaf.shape)
            assert all(s + n <= d for s, n, d in zip(c.start, c.shape, leaf.shape))
            assert c.nbytes == math.prod(c.shape) * itemsize
            assert type(c.crc32c) is int and c.crc32c >= 0
            volume += math.prod(c.shape)
            if c.nbytes:
                ranges.setdefault(c.file, []).append((c.offset, c.offset + c.nbytes))
            if math.prod(c.shape) <= 4096:  # small boxes: check element-wise disjointness
                box = {tuple(s + i for s, i in zip(c.start, idx))
                       for idx in np.ndindex(*c.shape)}
                assert not (box & cells), f"{leaf.path}: chunks overlap"
                cells |= box
        assert volume == math.prod(leaf.shape)
    for spans in ranges.values():
        spans.sort()
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            assert begin >= end, "chunks share file bytes"


FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    for cls in (Manifest, CommitMarker):
        try:
            cls.from_json(data, where=WHERE)
        except ALLOWED:
            pass


@FUZZ
@given(doc=json_values)
def test_fuzz_random_json(doc):
    data = json.dumps(doc).encode()
    for cls in (Manifest, CommitMarker):
        try:
            result = cls.from_json(data, where=WHERE)
        except ALLOWED:
            continue
        if cls is Manifest:
            _check_valid(result)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["hand-made", "saved"]))
def test_fuzz_mutated_manifest(saved, data, which):
    base = hand_made().to_json() if which == "hand-made" else saved[0]
    doc = _mutate(data, json.loads(base))
    encoded = json.dumps(doc).encode()
    try:
        m = Manifest.from_json(encoded, where=WHERE)
    except ALLOWED as e:
        assert e.path == WHERE
        return
    _check_valid(m)


@FUZZ
@given(data=st.data(), cut=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_fuzz_damaged_manifest_bytes(saved, data, cut, byte):
    raw = bytearray(saved[0])
    action = data.draw(st.sampled_from(["truncate", "set", "insert", "delete"]))
    i = cut % len(raw)
    if action == "truncate":
        del raw[i:]
    elif action == "set":
        raw[i] = byte
    elif action == "insert":
        raw.insert(i, byte)
    else:
        del raw[i]
    try:
        m = Manifest.from_json(bytes(raw), where=WHERE)
    except ALLOWED:
        return
    _check_valid(m)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_commit_marker(saved, data):
    doc = _mutate(data, json.loads(saved[1]))
    try:
        marker = CommitMarker.from_json(json.dumps(doc).encode(), where=WHERE)
    except ALLOWED:
        return
    assert marker.version[0] == FORMAT_VERSION[0]
    assert type(marker.manifest_nbytes) is int and marker.manifest_nbytes >= 0
    assert type(marker.manifest_crc32c) is int and marker.manifest_crc32c >= 0
    assert isinstance(marker.committed, float)


# ---------------------------------------------------------------------------------------------
# Format 1.2: per-chunk codec, stored size and digest.

DIGEST = "xxh3-128:" + "0123456789abcdef" * 2


def _doc_12(**extras: Any) -> dict[str, Any]:
    """The hand-made manifest as format 1.2, with ``extras`` on every chunk of ``['a']``."""
    doc = _doc()
    doc["version"] = "1.2"
    for chunk in doc["leaves"][0]["chunks"]:
        chunk.update(extras)
    return doc


def test_v12_raw_codec_and_digests_read():
    doc = _doc_12(codec="raw", digest=DIGEST)
    doc["leaves"][0]["chunks"][0]["stored_nbytes"] = doc["leaves"][0]["chunks"][0]["nbytes"]
    m = _parse(doc)
    assert m.version == (1, 2)
    chunks = m.leaves[0].chunks
    assert [c.codec for c in chunks] == ["raw"] * 3
    assert [c.digest for c in chunks] == [DIGEST] * 3
    assert chunks[0].stored == chunks[0].nbytes == chunks[0].stored_nbytes
    assert chunks[1].stored_nbytes is None and chunks[1].stored == chunks[1].nbytes
    assert Manifest.from_json(m.to_json(), where=WHERE) == m  # written back as read


def test_writers_keep_writing_1_0_without_1_2_members():
    text = hand_made().to_json()
    assert b'"version":"1.0"' in text
    assert b"codec" not in text and b"digest" not in text and b"stored_nbytes" not in text
    old = hand_made()
    leaf = dataclasses.replace(old.leaves[0], chunks=tuple(
        dataclasses.replace(c, digest=DIGEST) for c in old.leaves[0].chunks))
    with pytest.raises(ValueError, match="need format version 1.2"):
        dataclasses.replace(old, leaves=(leaf, *old.leaves[1:])).to_json()


@pytest.mark.parametrize(
    ("extras", "match"),
    [
        ({"codec": "lz4"}, "unknown codec 'lz4'"),
        ({"codec": "zstd"}, "zstd chunk needs stored_nbytes >= 1"),
        ({"codec": "zstd", "stored_nbytes": 0}, "zstd chunk needs stored_nbytes >= 1"),
        ({"codec": 3}, "unknown codec 3"),
        ({"codec": None}, "unknown codec None"),
        ({"codec": "raw", "stored_nbytes": 1}, "stored_nbytes 1 must equal"),
        ({"stored_nbytes": -1}, "stored_nbytes -1"),
        ({"stored_nbytes": "32"}, "stored_nbytes '32'"),
        ({"digest": "xxh3-128"}, "digest"),
        ({"digest": "xxh3-128:ABCDEF0123456789"}, "digest"),
        ({"digest": "xxh3-128:0123"}, "digest"),
        ({"digest": ":0123456789abcdef"}, "digest"),
        ({"digest": 7}, "digest"),
    ],
)
def test_v12_bad_chunk_members_rejected(extras, match):
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        _parse(_doc_12(**extras))
    assert info.value.leaf == "['a']"


def test_unknown_codec_in_a_newer_minor_asks_for_a_newer_keepax():
    doc = _doc_12(codec="lz4", stored_nbytes=7)
    doc["version"] = "1.4"
    with pytest.raises(FormatVersionError, match="upgrade keepax") as info:
        _parse(doc)
    assert info.value.leaf == "['a']"


def test_v12_real_checkpoint_with_digests_restores(tmp_path):
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": 3}
    path = tmp_path / "ckpt"
    keepax.save(str(path), tree)
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["version"] = "1.2"
    for leaf in doc["leaves"]:
        for chunk in leaf.get("chunks", []):
            chunk.update(codec="raw", stored_nbytes=chunk["nbytes"], digest=DIGEST)
    _rewrite(path, doc)
    restored = keepax.restore(str(path))
    assert np.array_equal(restored["w"], tree["w"]) and restored["step"] == 3
    assert keepax.inspect(str(path)).format_version == "1.2"
    assert keepax.verify(str(path)) == []


def _rewrite(path: Any, doc: Any, **marker: Any) -> None:
    """Writes a manifest and a commit marker that matches it."""
    data = json.dumps(doc).encode()
    (path / "manifest.json").write_bytes(data)
    fields = {"format": "keepax", "version": doc["version"], "manifest_nbytes": len(data),
              "manifest_crc32c": fmt.checksum(data), "committed": 1.0} | marker
    (path / "keepax.commit").write_text(json.dumps(fields).replace('"HUGE"', str(10**309)))


# ---------------------------------------------------------------------------------------------
# Hostile values (issue 12): every one is a CorruptCheckpointError, never another exception.


@pytest.mark.parametrize("name", [",3", "04", "f4,f4", "(3,)f4", "[('a', 'f4')]", "i4 ", "b1",
                                  "int", "complex32", "bcomplex32", "m8", "M8[s]", "a5"])
def test_dtype_names_are_looked_up_never_parsed(tmp_path, name):
    with pytest.raises(CorruptCheckpointError, match="unknown or unsupported dtype"):
        _parse(_one_leaf_doc(name, 1))
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"x": np.zeros(2, np.uint8)})
    doc = json.loads((path / "manifest.json").read_bytes())
    doc["leaves"][0]["dtype"] = name
    _rewrite(path, doc)
    for call in (keepax.inspect, keepax.restore, keepax.verify):
        with pytest.raises(CorruptCheckpointError):
            call(str(path))


@pytest.mark.parametrize(
    "value", [10**309, -(10**309), 10**20, "1e400", "-1e400", -1, 1e12],
    ids=["1e309-int", "-1e309-int", "1e20-int", "1e400", "-1e400", "-1", "1e12"],
)
def test_huge_or_impossible_times_are_damage(tmp_path, value):
    text = json.dumps({"format": "keepax", "version": "1.0", "manifest_nbytes": 1,
                       "manifest_crc32c": 0, "committed": "X"})
    raw = text.replace('"X"', value if isinstance(value, str) else repr(value)).encode()
    with pytest.raises(CorruptCheckpointError, match="committed must be a Unix time"):
        CommitMarker.from_json(raw, where=WHERE)
    manifest = json.dumps(_doc() | {"created": "X"})
    raw = manifest.replace('"X"', value if isinstance(value, str) else repr(value)).encode()
    with pytest.raises(CorruptCheckpointError, match="created must be a Unix time"):
        Manifest.from_json(raw, where=WHERE)
    # End to end: the marker (no checksum) and the manifest of a real checkpoint.
    path = tmp_path / "ckpt"
    keepax.save(str(path), {"x": np.zeros(2, np.uint8)})
    doc = json.loads((path / "manifest.json").read_bytes())
    _rewrite(path, doc, committed="HUGE")
    for call in (keepax.inspect, keepax.restore, keepax.verify):
        with pytest.raises(CorruptCheckpointError):
            call(str(path))


def test_times_in_range_are_kept():
    assert _parse(_doc() | {"created": 0}).created == 0.0
    assert _parse(_doc() | {"created": 4102444800}).created == 4102444800.0
    assert _parse(_doc() | {"created": 1e11}).created == 1e11


# ---------------------------------------------------------------------------------------------
# Validation cost: a disjoint cover crafted against a sweep (issue 12 point 3).


def _staircase(k: int, *, overlap: bool = False) -> bytes:
    """A manifest whose one uint8 array (2k x 2k) is cut into 3k chunks: k rows of width k on
    the top left, k columns of height k on the top right, k full rows below. A sweep along
    axis 0 keeps all k columns active while it passes the k top rows (k**2 comparisons).
    ``overlap``: the last row is moved up one (same volume, one row twice, one never)."""
    n = 2 * k
    boxes = [((r, 0), (1, k)) for r in range(k)]
    boxes += [((0, c), (k, 1)) for c in range(k, n)]
    boxes += [((r, 0), (1, n)) for r in range(k, n)]
    if overlap:
        boxes[-1] = ((n - 2, 0), (1, n))
    chunks, offset = [], 64
    for start, shape in boxes:
        size = shape[0] * shape[1]
        chunks.append({"file": 0, "offset": offset, "nbytes": size, "start": list(start),
                       "shape": list(shape), "crc32c": 0})
        offset += size
    return json.dumps({
        "format": "keepax", "version": "1.0",
        "files": [{"name": "data/p00000-000.safetensors", "nbytes": offset}],
        "tree": {"k": "leaf", "i": 0},
        "leaves": [{"path": "", "type": "numpy", "shape": [n, n], "dtype": "uint8",
                    "chunks": chunks}],
    }).encode()


def _lines_executed(fn: Any) -> int:
    """Python lines executed by ``fn()`` (a measure of work that does not depend on the
    machine's speed)."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_crafted_cover_validation_grows_linearly():
    small, large = _staircase(300), _staircase(600)
    work_small = _lines_executed(lambda: Manifest.from_json(small, where=WHERE))
    work_large = _lines_executed(lambda: Manifest.from_json(large, where=WHERE))
    # Twice the chunks, about twice the work (a quadratic check does four times as much).
    assert work_large < 2.5 * work_small, (work_small, work_large)


@pytest.mark.timeout(60)
def test_crafted_cover_of_24k_chunks_is_checked(tmp_path):
    data = _staircase(8000)
    m = Manifest.from_json(data, where=WHERE)
    assert len(m.leaves[0].chunks) == 24_000
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        Manifest.from_json(_staircase(8000, overlap=True), where=WHERE)
    # Through inspect too (the data file need not exist for inspect).
    path = tmp_path / "ckpt"
    path.mkdir()
    _rewrite(path, json.loads(data))
    assert keepax.inspect(str(path)).leaves[0].chunks == 24_000


@pytest.mark.parametrize("k", [1, 2, 5])
def test_small_overlapping_covers_rejected(k):
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        Manifest.from_json(_staircase(k, overlap=True), where=WHERE)
    assert Manifest.from_json(_staircase(k), where=WHERE).leaves[0].shape == (2 * k, 2 * k)
