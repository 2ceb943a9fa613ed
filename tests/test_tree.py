"""Tree structure <-> JSON, key paths, plain rebuilds and selectors."""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from keepax._src.format import tree
from keepax.errors import CorruptCheckpointError, UnsupportedLeafError

NT = collections.namedtuple("NT", "a b")


def test_describe_matches_jax_flatten_order_and_paths() -> None:
    t = {"b": [1, (2, None)], "a": NT(3, {"z": 4, "y": 5})}
    s = tree.describe(t)
    flat = jax.tree_util.tree_flatten_with_path(t)[0]
    assert s.leaves == [v for _, v in flat]
    assert [tree.keystr(p) for p in s.paths] == [jax.tree_util.keystr(p) for p, _ in flat]
    json.dumps(s.node)  # JSON-serialisable


def test_key_encodings_round_trip() -> None:
    t = {"d": {1: "i", 2: "j"}, "t": {(1, "x", None): 0}, "f": {0.5: 1, -0.0: 2}, "b": {True: 1}}
    s = tree.describe(t)
    node = json.loads(json.dumps(s.node))
    back = tree.rebuild_plain(node, lambda i: s.leaves[i])
    assert back == t
    assert list(back["d"]) == [1, 2]


def test_unsupported_dict_key() -> None:
    class K:
        def __lt__(self, other):  # sortable, so JAX accepts it
            return False

    with pytest.raises(UnsupportedLeafError, match="dict key"):
        tree.describe({K(): 1})


def test_rebuild_plain_turns_custom_nodes_into_dicts() -> None:
    s = tree.describe({"nt": NT(1, 2), "l": [3], "t": (4,), "n": None, "e": {}})
    back = tree.rebuild_plain(s.node, lambda i: s.leaves[i])
    assert back == {"nt": {"a": 1, "b": 2}, "l": [3], "t": (4,), "n": None, "e": {}}


def test_rebuild_plain_with_keep_prunes_and_drops_empty_containers() -> None:
    s = tree.describe({"p": {"w": 1, "b": 2}, "o": {"m": 3}, "s": 4})
    keep = lambda p: tree.path_matches(p, ("p", "w"))  # noqa: E731
    assert tree.rebuild_plain(s.node, lambda i: s.leaves[i], keep=keep) == {"p": {"w": 1}}


def test_leaf_paths() -> None:
    s = tree.describe({"a": [1, NT(2, 3)]})
    paths = tree.leaf_paths(s.node)
    assert paths[2] == (DictKey("a"), SequenceKey(1), GetAttrKey("b"))


def test_path_matches() -> None:
    path = (DictKey("params"), DictKey(3), SequenceKey(0), GetAttrKey("mu"))
    assert tree.path_matches(path, ("params",))
    assert tree.path_matches(path, ("params", 3, 0, "mu"))
    assert tree.path_matches(path, ("params", "3", "0"))
    assert not tree.path_matches(path, ("params", 4))
    assert not tree.path_matches(path, ("params", 3, 0, "mu", "x"))


@pytest.mark.parametrize("x", [0.0, -0.0, float("inf"), float("nan"), 1e-310, 3.5])
def test_float_bits(x: float) -> None:
    y = tree.decode_float(tree.encode_float(x))
    assert np.array([x]).view(np.uint64)[0] == np.array([y]).view(np.uint64)[0]


@pytest.mark.parametrize(
    "node",
    [
        [],
        {"k": "leaf"},
        {"k": "leaf", "i": "0"},
        {"k": "dict", "keys": ["a"], "c": []},
        {"k": "dict", "keys": [{"bad": 1}], "c": [{"k": "none"}]},
        {"k": "list"},
        {"k": "weird", "c": []},
        {"k": "node", "keys": [["nope", 1]], "c": [{"k": "none"}]},
    ],
)
def test_corrupt_tree_nodes(node) -> None:
    with pytest.raises(CorruptCheckpointError):
        tree.rebuild_plain(node, lambda i: i)
