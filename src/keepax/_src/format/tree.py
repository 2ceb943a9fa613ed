"""Pytrees <-> a JSON description of their structure, leaves by key path, and `like` matching.

A tree is described as nested JSON nodes. Every container node lists the JAX key entries of its
children, so a checkpoint can be rebuilt without the user's classes (as plain dicts, lists and
tuples), and every leaf is known by the key path string that ``jax.tree_util.keystr`` prints.

Node encodings (the normative description is in ``docs/FORMAT.md``)::

    {"k": "leaf", "i": 3}                       # the 4th leaf in flatten order
    {"k": "none"}                               # None (an empty pytree node in JAX)
    {"k": "dict", "keys": [KEY...], "c": [NODE...]}
    {"k": "list" | "tuple", "c": [NODE...]}
    {"k": "namedtuple" | "dataclass" | "node", "type": "module.Qualname",
     "keys": [ENTRY...], "c": [NODE...]}

where ``KEY`` is a dict key (a JSON string for ``str`` keys, else a one-field object such as
``{"int": 3}``) and ``ENTRY`` is ``["key", KEY]``, ``["attr", name]``, ``["index", i]`` or
``["flat", i]``.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from keepax.errors import CorruptCheckpointError, UnsupportedLeafError

KeyPath = tuple[Any, ...]
"""A tuple of JAX key entries (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ...)."""

__all__ = [
    "KeyPath",
    "Structure",
    "describe",
    "rebuild_plain",
    "leaf_paths",
    "path_matches",
    "keystr",
    "encode_float",
    "decode_float",
]


def keystr(path: KeyPath) -> str:
    """Formats a key path the way ``jax.tree_util.keystr`` does (``['params']['w']``)."""
    return jax.tree_util.keystr(tuple(path))


def encode_float(x: float) -> str:
    """Encodes a Python float bit-exactly (NaN payloads and -0.0 kept) as 16 hex digits."""
    return struct.pack(">d", x).hex()


_FLOAT_BITS = re.compile(r"[0-9a-f]{16}")


def decode_float(bits: str) -> float:
    """Inverse of :func:`encode_float`.

    Raises:
      ValueError: if ``bits`` is not exactly 16 lowercase hex digits.
    """
    if not isinstance(bits, str) or not _FLOAT_BITS.fullmatch(bits):
        raise ValueError(f"invalid float encoding {bits!r:.40}")
    return struct.unpack(">d", bytes.fromhex(bits))[0]


def _encode_key(key: Any, where: str) -> Any:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return {"bool": key}
    if isinstance(key, int):
        return {"int": key}
    if isinstance(key, float):
        return {"float": encode_float(key)}
    if key is None:
        return {"none": None}
    if isinstance(key, tuple):
        return {"tuple": [_encode_key(k, where) for k in key]}
    raise UnsupportedLeafError(
        f"dict key {key!r} of type {type(key).__name__} cannot be stored; use str, int, float, "
        "bool, None or tuples of those as dict keys",
        leaf=where,
    )


def _decode_key(obj: Any) -> Any:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "bool" and isinstance(value, bool):
            return value
        if tag == "int" and type(value) is int:
            return value
        if tag == "float" and isinstance(value, str):
            return decode_float(value)
        if tag == "none" and value is None:
            return None
        if tag == "tuple" and isinstance(value, list):
            return tuple(_decode_key(v) for v in value)
    raise ValueError(f"invalid dict key encoding {obj!r}")


def _encode_entry(entry: Any, where: str) -> list[Any]:
    if isinstance(entry, DictKey):
        return ["key", _encode_key(entry.key, where)]
    if isinstance(entry, GetAttrKey):
        return ["attr", entry.name]
    if isinstance(entry, SequenceKey):
        return ["index", entry.idx]
    if isinstance(entry, FlattenedIndexKey):
        return ["flat", entry.key]
    raise UnsupportedLeafError(f"unknown pytree key entry {entry!r}", leaf=where)


def _decode_entry(obj: Any) -> Any:
    if not (isinstance(obj, list) and len(obj) == 2):
        raise ValueError(f"invalid key entry {obj!r}")
    tag, value = obj
    if tag == "key":
        return DictKey(_decode_key(value))
    if tag == "attr" and isinstance(value, str):
        return GetAttrKey(value)
    if tag == "index" and type(value) is int:
        return SequenceKey(value)
    if tag == "flat" and type(value) is int:
        return FlattenedIndexKey(value)
    raise ValueError(f"invalid key entry {obj!r}")


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _node_kind(node: Any) -> str:
    if type(node) is dict:
        return "dict"
    if type(node) is list:
        return "list"
    if type(node) is tuple:
        return "tuple"
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return "namedtuple"
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return "dataclass"
    return "node"


_LEAF_TYPES = (jax.Array, np.ndarray, np.generic, str, bytes, int, float, complex)


@dataclasses.dataclass(frozen=True)
class Structure:
    """The result of describing a tree: its JSON node and its leaves in flatten order.

    Attributes:
      node: The JSON description (see the module docstring).
      paths: Key path of every leaf, in flatten order.
      leaves: The leaves themselves, in flatten order.
      names: Every leaf's :func:`keystr`, in flatten order (made once, while describing).
    """

    node: dict[str, Any]
    paths: list[KeyPath]
    leaves: list[Any]
    names: list[str] = dataclasses.field(default_factory=list)


def describe(tree: Any) -> Structure:
    """Describes a tree's structure as JSON and lists its leaves with their key paths.

    Leaves are what ``jax.tree_util.tree_flatten`` yields, in the same order.

    Raises:
      UnsupportedLeafError: for dict keys that cannot be written as JSON.
    """
    paths: list[KeyPath] = []
    leaves: list[Any] = []
    names: list[str] = []

    def walk(node: Any, path: KeyPath, name: str) -> dict[str, Any]:
        if node is None:
            return {"k": "none"}
        if isinstance(node, _LEAF_TYPES):
            # Never pytree nodes: skip asking JAX (a flatten call per leaf adds up).
            paths.append(path)
            leaves.append(node)
            names.append(name)
            return {"k": "leaf", "i": len(leaves) - 1}
        kind_ = type(node)
        if kind_ is dict and all(type(k) is str for k in node):
            # The common node, without asking JAX (which sorts str keys the same way).
            keys = sorted(node)
            entries_ = [DictKey(k) for k in keys]
            return {"k": "dict", "keys": keys,
                    "c": [walk(node[k], path + (e,), name + str(e))  # noqa: F821 - see del
                          for k, e in zip(keys, entries_)]}
        if kind_ is list or kind_ is tuple:
            entries_ = [SequenceKey(i) for i in range(len(node))]
            return {"k": "list" if kind_ is list else "tuple",
                    "c": [walk(child, path + (e,), name + str(e))  # noqa: F821 - see del
                          for child, e in zip(node, entries_)]}
        children, treedef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node
        )
        if jax.tree_util.treedef_is_leaf(treedef) and treedef.num_nodes == 1 and (  # type: ignore[attr-defined]
            treedef.num_leaves == 1  # type: ignore[attr-defined]
        ):
            # A leaf: JAX did not descend into it.
            paths.append(path)
            leaves.append(node)
            names.append(name)
            return {"k": "leaf", "i": len(leaves) - 1}
        kind = _node_kind(node)
        out: dict[str, Any] = {"k": kind}
        where = name
        entries = [entry for (entry,), _ in children]
        if kind == "dict":
            out["keys"] = [_encode_key(e.key, where) for e in entries]
        elif kind not in ("list", "tuple"):
            out["type"] = _qualname(node)
            out["keys"] = [_encode_entry(e, where) for e in entries]
        # keystr(path + (entry,)) == name + str(entry): one str() per entry, not per depth.
        out["c"] = [walk(child, path + (entry,), name + str(entry))  # noqa: F821 - see del
                    for (entry,), child in children]
        return out

    try:
        return Structure(walk(tree, (), ""), paths, leaves, names)
    finally:
        del walk  # the recursive closure is a reference cycle holding the leaves


def rebuild_plain(
    node: dict[str, Any],
    leaf: Callable[[int], Any],
    *,
    keep: Callable[[KeyPath], bool] | None = None,
    on_leaf: Callable[[int, KeyPath], None] | None = None,
    make_node: Callable[[str | None, list[Any], list[Any]], Any] | None = None,
) -> Any:
    """Rebuilds a tree from its JSON description as plain dicts, lists and tuples.

    Namedtuples, dataclasses and custom nodes become dicts keyed by field name (or index).

    Args:
      node: The JSON description, from a manifest (untrusted: validated here).
      leaf: Called with a leaf index; returns the value to put there.
      keep: If given, subtrees whose key path it rejects are left out: leaves, ``None``s and
        empty containers outside the kept paths, and containers left empty. A list or tuple
        that loses some items becomes a dict keyed by position, so indices keep their meaning.
      on_leaf: Called with each leaf's index and key path as it is visited.
      make_node: Called as ``make_node(type_name, names, values)`` for each namedtuple,
        dataclass or custom node kept whole; a result other than None replaces the dict it
        would become.

    Raises:
      CorruptCheckpointError: if the description is malformed.
    """
    _MISSING = object()

    def walk(n: Any, path: KeyPath) -> Any:
        kind = _kind(n)
        if kind == "leaf":
            index = _leaf_index(n)
            if keep is not None and not keep(path):
                return _MISSING
            if on_leaf is not None:
                on_leaf(index, path)
            return leaf(index)
        if kind == "none":
            return _MISSING if keep is not None and not keep(path) else None
        entries, children = _container_entries(n, kind, path)
        values = [walk(child, path + (entry,))  # noqa: F821 - see the del below
                  for entry, child in zip(entries, children)]
        pairs = [(e, v) for e, v in zip(entries, values) if v is not _MISSING]
        if keep is not None and not pairs and (children or not keep(path)):
            return _MISSING
        if kind in ("list", "tuple"):
            if len(pairs) < len(values):  # a part selected: positions keep their meaning
                return {e.idx: v for e, v in pairs}
            return list(values) if kind == "list" else tuple(values)
        if kind == "dict":
            return {e.key: v for e, v in pairs}
        if make_node is not None and len(pairs) == len(values):
            built = make_node(n.get("type"), [entry_name(e) for e in entries], values)
            if built is not None:
                return built
        return {entry_name(e): v for e, v in pairs}

    try:
        result = walk(node, ())
    finally:
        # The recursive closure is a reference cycle that holds ``leaf`` (and through it the
        # restored arrays) until the cyclic collector runs: break it now.
        del walk
    return {} if result is _MISSING else result


def _container_entries(n: dict[str, Any], kind: Any, path: KeyPath) -> tuple[list[Any], list[Any]]:
    """The key entries and children of an untrusted container node.

    Raises:
      CorruptCheckpointError: the node is malformed.
    """
    children = n.get("c")
    if not isinstance(children, list):
        raise CorruptCheckpointError(f"container node without children at {keystr(path)}")
    try:
        if kind in ("list", "tuple"):
            entries: list[Any] = [SequenceKey(i) for i in range(len(children))]
        elif kind == "dict":
            entries = [DictKey(_decode_key(k)) for k in n.get("keys", [])]
        elif kind in ("namedtuple", "dataclass", "node"):
            entries = [_decode_entry(e) for e in n.get("keys", [])]
        else:
            raise ValueError(f"unknown node kind {kind!r}")
    except (ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"invalid tree node at {keystr(path)}: {e}") from e
    if len(entries) != len(children):
        raise CorruptCheckpointError(f"keys and children differ in length at {keystr(path)}")
    if len(set(entries)) != len(entries):
        raise CorruptCheckpointError(f"a key appears twice at {keystr(path)}")
    return entries, children


def entry_name(entry: Any) -> Any:
    """The name of a key path entry: a dict key, an attribute name or an index."""
    if isinstance(entry, DictKey):
        return entry.key
    if isinstance(entry, GetAttrKey):
        return entry.name
    if isinstance(entry, SequenceKey):
        return entry.idx
    return entry.key


def leaf_paths(
    node: dict[str, Any], names: dict[int, str] | None = None
) -> dict[int, KeyPath]:
    """Returns the key path of every leaf of a JSON description, by leaf index (in tree
    order), and fills ``names`` (if given) with each leaf's :func:`keystr`.

    Raises:
      CorruptCheckpointError: if the description is malformed or names a leaf twice.
    """
    collected: dict[int, KeyPath] = {}

    def walk(n: Any, path: KeyPath, name: str) -> None:
        kind = _kind(n)
        if kind == "leaf":
            index = _leaf_index(n)
            if index in collected:
                raise CorruptCheckpointError(f"leaf {index} appears twice in the tree")
            collected[index] = path
            if names is not None:
                names[index] = name
            return
        if kind == "none":
            return
        entries, children = _container_entries(n, kind, path)
        for entry, child in zip(entries, children):
            # keystr(path + (entry,)) == name + str(entry): one str() per entry, not per depth.
            walk(child, path + (entry,), name + str(entry))  # noqa: F821 - see the del below

    try:
        walk(node, (), "")
    finally:
        del walk  # the recursive closure is a reference cycle
    return collected


def path_matches(path: KeyPath, selector: Sequence[Any]) -> bool:
    """Whether ``selector`` (a sequence of key names) is a prefix of ``path``.

    An element matches an entry if it equals the entry's dict key, attribute name or index
    (same type), or if it is a string equal to ``str()`` of that name.
    """
    if len(selector) > len(path):
        return False
    for want, entry in zip(selector, path):
        name = entry_name(entry)
        if want == name and type(want) is type(name):
            continue
        if isinstance(want, str) and str(name) == want:
            continue
        return False
    return True


def _kind(n: Any) -> Any:
    """A JSON tree node's kind (``"k"``), once it is checked to be an object."""
    if not isinstance(n, dict):
        raise CorruptCheckpointError(f"tree node is not an object: {n!r:.80}")
    return n.get("k")


def _leaf_index(n: dict[str, Any]) -> int:
    """A leaf node's index (``"i"``), checked."""
    index = n.get("i")
    if type(index) is not int or index < 0:
        raise CorruptCheckpointError(f"leaf node without index: {n!r:.80}")
    return index
