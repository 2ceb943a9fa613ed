"""The single-file container: one safetensors file whose ``__metadata__`` embeds a keepax
manifest (docs/FORMAT.md §13). Writing its header and reading it back, for ``save_file`` /
``load_file`` and for the per-process values a checkpoint directory stores as such containers.

Nothing here restores a tree: :func:`parse_bytes` and :func:`read_manifest` give the manifest
and a storage view of the file, and the restore code reads through them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from keepax._src.checkpoint.plan import LeafPlan, plan_leaves
from keepax._src.format import datafiles as format
from keepax._src.format import spec
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import ArrayLeaf, Chunk, DataFile, Manifest
from keepax._src.io import Reader, Storage
from keepax.errors import CorruptCheckpointError, FormatVersionError

__all__ = [
    "FILE_FORMAT_NAME", "FILE_FORMAT_VERSION", "SELF_NAME", "BytesReader", "Borrowed",
    "ThisFile", "chunk_bytes", "corrupt", "dump_bytes", "header", "parse_bytes", "read_manifest",
]

FILE_FORMAT_NAME = "keepax-file"
FILE_FORMAT_VERSION = (1, 0)
"""(major, minor) of the single-file container. Readers reject a newer major version."""

SELF_NAME = "data/self.safetensors"
"""The name under which the embedded manifest lists the file itself (its only data file)."""

_ALIGN = 64
_CRC_RE = re.compile(r"[0-9]{1,10}")


def chunk_bytes(source: ChunkSource) -> memoryview:
    """A chunk's bytes, C order (copied only when the source is not C-contiguous)."""
    array = np.asarray(source.data())
    if array.shape != source.shape:
        raise ValueError(f"chunk {source.name}: got shape {array.shape}, want {source.shape}")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def header(
    plan: LeafPlan, crcs: Sequence[int], metadata: dict[str, Any], created: float
) -> bytes:
    """The length-prefixed safetensors header embedding the manifest.

    Chunk offsets in the manifest are absolute, so they depend on the header's length, which
    depends on them: lengths are tried in increasing multiples of 64 until the header fits
    (twice in practice; the extra room is space padding, as safetensors allows).
    """
    length = 0  # the header's length in bytes, padding included; (8 + length) % 64 == 0
    while True:
        offset = 8 + length
        chunks: dict[int, list[tuple[ChunkSource, Chunk]]] = {}
        for source, crc in zip(plan.sources, crcs):
            chunk = Chunk(0, offset, source.nbytes, source.start, source.shape, crc)
            chunks.setdefault(source.leaf, []).append((source, chunk))
            offset += source.nbytes
        manifest = plan.manifest([DataFile(SELF_NAME, offset)], chunks, metadata, created=created)
        manifest_text = manifest.to_json().decode("ascii")
        text = format.header_json(
            {
                "format": FILE_FORMAT_NAME,
                "format_version": spec.version_text(FILE_FORMAT_VERSION),
                "manifest": manifest_text,
                "manifest_crc32c": str(format.checksum(manifest_text.encode("ascii"))),
            },
            plan.sources,
        )
        if len(text) <= length:
            return format.pad_header(text, length)
        length = len(text) + (-(8 + len(text))) % _ALIGN


def dump_bytes(tree_: Any) -> bytes:
    """A pytree as the bytes of a single-file checkpoint (how a per-process value is stored
    in a checkpoint directory).

    Raises:
      UnsupportedLeafError: a leaf cannot be stored.
    """
    plan = plan_leaves(tree_)
    views = [chunk_bytes(source) for source in plan.sources]
    head = header(plan, [format.checksum(view) for view in views], {}, 0.0)
    return b"".join([head, *views])


def parse_bytes(data: bytes, where: str) -> tuple[Storage, str, Manifest]:
    """The bytes :func:`dump_bytes` made, as ``(storage, name, manifest)`` for the restore
    code (``restore_manifest``).

    Raises:
      CorruptCheckpointError, FormatVersionError: the bytes are not a valid container.
    """
    reader = BytesReader(data)
    manifest = read_manifest(reader, "value", where)
    return ThisFile(reader, "bytes://", "value"), "value", manifest


def corrupt(message: str, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{message}; the file is damaged or is not a keepax single-file checkpoint", path=where
    )


def read_manifest(reader: Reader, name: str, where: str) -> Manifest:
    """Reads and checks the header; returns the manifest with the file itself as file 0."""
    size = reader.size()
    try:
        length, doc = format.read_header(reader, size)
    except ValueError as e:
        raise corrupt(str(e), where) from e
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise corrupt("the safetensors header has no __metadata__", where)
    kind = meta.get("format")
    if kind != FILE_FORMAT_NAME:
        hint = (
            " (a data file of a keepax checkpoint directory: restore the directory with "
            "keepax.restore)"
            if kind == "keepax"
            else ""
        )
        raise corrupt(f"format is {kind!r:.40}, expected {FILE_FORMAT_NAME!r}{hint}", where)
    _check_version(meta.get("format_version"), where)
    text, crc = meta.get("manifest"), meta.get("manifest_crc32c")
    if not (isinstance(text, str) and isinstance(crc, str) and _CRC_RE.fullmatch(crc)):
        raise corrupt("__metadata__ lacks the manifest or its manifest_crc32c", where)
    try:
        manifest_bytes = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise corrupt(f"the manifest is not valid text ({e})", where) from e
    if format.checksum(manifest_bytes) != int(crc):
        raise corrupt("the manifest does not match its checksum (modified?)", where)
    manifest = Manifest.from_json(manifest_bytes, where=where)
    if len(manifest.files) != 1 or manifest.files[0].name != SELF_NAME:
        raise corrupt(f"the manifest must list exactly one file, {SELF_NAME!r}", where)
    if manifest.files[0].nbytes != size:
        raise corrupt(
            f"the file has {size} bytes, its manifest says {manifest.files[0].nbytes} "
            "(truncated or extended)",
            where,
        )
    for leaf in manifest.leaves:
        if isinstance(leaf, ArrayLeaf) and any(c.offset < 8 + length for c in leaf.chunks):
            raise CorruptCheckpointError(
                "a chunk lies inside the header; the file is damaged", path=where, leaf=leaf.path
            )
    # From here the file is known by its own name (in messages and to ThisFile).
    return dataclasses.replace(manifest, files=(DataFile(name, size),))


def _check_version(text: Any, where: str) -> None:
    version = spec.parse_version(text)
    if version is None:
        raise corrupt(f"format_version must be 'MAJOR.MINOR', got {text!r:.40}", where)
    if version[0] > FILE_FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"written in keepax single-file format {text}, but this keepax reads format "
            f"{FILE_FORMAT_VERSION[0]}.x only; upgrade keepax to read it",
            path=where,
        )
    if version[0] < 1:
        raise FormatVersionError(f"unknown keepax single-file format version {text}", path=where)


class BytesReader(Reader):
    """Bytes in memory, read as a file."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read_into(self, offset: int, out: memoryview) -> int:
        part = self._data[offset:offset + len(out)]
        out[: len(part)] = part
        return len(part)

    def size(self) -> int:
        return len(self._data)


class Borrowed(Reader):
    """The open file, lent to the shared reading code (which closes what it opens)."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def read_into(self, offset: int, out: memoryview) -> int:
        return self._reader.read_into(offset, out)

    def size(self) -> int:
        return self._reader.size()


class ThisFile(Storage):
    """A read-only view of one open file as a checkpoint directory ``name`` whose only data
    file (``name/name``) is the file itself: how the directory format's reading code reads a
    single file. Every read goes to the same open file, so a concurrent overwrite (a rename)
    cannot mix two versions."""

    def __init__(self, reader: Reader, url: str, name: str) -> None:
        self._reader, self._path, self.url = reader, f"{name}/{name}", url

    def open(self, path: str) -> Reader:
        if path != self._path:
            raise FileNotFoundError(path)
        return Borrowed(self._reader)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a single-file checkpoint is read-only here")

    create = exists = is_dir = list = delete = rename_dir = _read_only
