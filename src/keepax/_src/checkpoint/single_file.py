"""Single-file checkpoints: one safetensors file holding a keepax manifest and its arrays.

For small states (an optimizer's memory, accumulated matrices, best parameters, a history)
where a directory per checkpoint is more than needed. The file is a valid safetensors file
whose ``__metadata__`` carries the container's format name and version, the keepax manifest
(docs/FORMAT.md §5) as a JSON string and that string's CRC-32C; the manifest's single data
file is the file itself, with absolute chunk offsets. The normative description is
docs/FORMAT.md §13.

Saving reuses :func:`plan_leaves` (how leaves are stored); loading presents the file
to :func:`restoring.restore_manifest` as a checkpoint whose only data file is the file itself,
so ``like``, ``select``, ``partial`` and ``dtype`` behave exactly as in ``keepax.restore``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from keepax._src.checkpoint import inspection, opening, restoring, saving
from keepax._src.checkpoint.plan import LeafPlan, plan_leaves
from keepax._src.commit.protocol import SaveResult
from keepax._src.format import datafiles as format
from keepax._src.format import spec
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import ArrayLeaf, Chunk, DataFile, Manifest
from keepax._src.io import (
    LocalStorage,
    MemoryStorage,
    Reader,
    Storage,
    Writer,
    is_hidden_name,
    split_checkpoint_path,
)
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    KeepaxError,
)

__all__ = [
    "save_file", "load_file", "inspect_file", "FILE_FORMAT_NAME", "FILE_FORMAT_VERSION",
    "SELF_NAME",
]

FILE_FORMAT_NAME = "keepax-file"
FILE_FORMAT_VERSION = (1, 0)
"""(major, minor) of the single-file container. Readers reject a newer major version."""

SELF_NAME = "data/self.safetensors"
"""The name under which the embedded manifest lists the file itself (its only data file)."""

_ALIGN = 64
_CRC_RE = re.compile(r"[0-9]{1,10}")
_TEMP_TAG = ".keepax-tmp-"
_TEMP_RE = re.compile(r"\.keepax-tmp-[0-9a-f]{12}")


# ---------------------------------------------------------------------------------------------
# Save.


def save_file(
    path: str | os.PathLike[str],
    tree_: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> SaveResult:
    """Saves a pytree as one file, durably and atomically.

    Meant for small states (the file is assembled in host memory): an optimizer's state,
    accumulated matrices, best parameters and cost, normaliser scales, a history of dicts.
    Leaves are stored as by :func:`keepax.save` (arrays as arrays, Python values exactly, no
    pickle), so ``jax.Array``s nested in a history list need no conversion. The file is a
    valid safetensors file (docs/FORMAT.md §13).

    The file is written to a hidden sibling (``<name>.keepax-tmp-<hex>``), fsynced, renamed
    into place and the directory fsynced: a crash leaves either the old file (or none) or the
    complete new one. The temporary a crashed save left behind is removed by the next
    ``save_file`` to the same path (saves to one directory hold a lock on it while they
    write, so a temporary found there under the lock belongs to no running save).

    Args:
      path: The file to create: a local path (or ``memory://store/name``).
      tree_: Any pytree :func:`keepax.save` accepts.
      metadata: JSON-serialisable user metadata stored in the manifest.
      overwrite: Replace an existing file at ``path`` (atomically: if this save fails, the old
        file is intact).

    Returns:
      What was written.

    Raises:
      CheckpointExistsError: ``path`` exists and ``overwrite`` is false, or is a directory.
      UnsupportedLeafError: a leaf (named by key path) cannot be stored.
      KeepaxError: ``path`` is not a local path, or ``metadata`` is not JSON-serialisable.
    """
    began = time.perf_counter()
    storage, name, where = _locate(path)
    if is_hidden_name(name):
        raise KeepaxError(
            "file names must not contain '.keepax-' (reserved for temporary files)", path=where
        )
    if jax.process_count() > 1:
        raise KeepaxError(
            "keepax.save_file is single-process: in a multi-process run no process holds every "
            "shard; save a checkpoint directory instead",
            path=where,
        )
    if storage.is_dir(name):
        raise CheckpointExistsError(
            "a directory exists here; save_file writes a single file and never replaces a "
            "directory: choose another name",
            path=where,
        )
    if storage.exists(name) and not overwrite:
        raise CheckpointExistsError(
            "a file already exists here; pass overwrite=True to replace it", path=where
        )
    metadata = saving.check_metadata(metadata, where)
    plan = plan_leaves(tree_)
    # CRCs go into the header, which precedes the data: take every chunk to host memory first.
    views = [_chunk_bytes(source) for source in plan.sources]
    crcs = [format.checksum(view) for view in views]
    header = _header(plan, crcs, metadata, time.time())
    size = len(header) + sum(len(v) for v in views)
    _write(storage, name, where, [memoryview(header), *views], overwrite=overwrite)
    return SaveResult(where, size, 1, time.perf_counter() - began)


def dump_bytes(tree_: Any) -> bytes:
    """A pytree as the bytes of a single-file checkpoint (how a per-process value is stored
    in a checkpoint directory).

    Raises:
      UnsupportedLeafError: a leaf cannot be stored.
    """
    plan = plan_leaves(tree_)
    views = [_chunk_bytes(source) for source in plan.sources]
    header = _header(plan, [format.checksum(view) for view in views], {}, 0.0)
    return b"".join([header, *views])


def load_bytes(data: bytes, like: Any, where: str) -> Any:
    """The pytree in the bytes :func:`dump_bytes` made (``like`` as for :func:`load_file`).

    Raises:
      CorruptCheckpointError, TreeMismatchError: as :func:`load_file`.
    """
    reader = _BytesReader(data)
    manifest = _read_manifest(reader, "value", where)
    return restoring.restore_manifest(_ThisFile(reader, "bytes://", "value"), "value", where,
                                     manifest, like)


def _locate(path: str | os.PathLike[str]) -> tuple[Storage, str, str]:
    """The storage holding ``path``, the file's name in it, and the path for messages."""
    text = os.fspath(path)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme == "file":
        text = text[len("file://") :]
    if scheme not in (None, "file", "memory"):
        raise KeepaxError(
            f"single-file checkpoints are written to local paths (or memory://) only, not "
            f"{scheme}:// URLs; save to a local file and copy it, or use keepax.save",
            path=text,
        )
    try:
        storage, name = split_checkpoint_path(text)
    except ValueError as e:
        raise KeepaxError(str(e), path=text) from e
    return storage, name, storage.display(name)


def _chunk_bytes(source: ChunkSource) -> memoryview:
    """A chunk's bytes, C order (copied only when the source is not C-contiguous)."""
    array = np.asarray(source.data())
    if array.shape != source.shape:
        raise ValueError(f"chunk {source.name}: got shape {array.shape}, want {source.shape}")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _header(
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


def _write(
    storage: Storage, name: str, where: str, parts: list[memoryview], *, overwrite: bool
) -> None:
    """Writes a file atomically: temporary sibling, fsync, rename, fsync of the directory."""
    if isinstance(storage, MemoryStorage):
        # An in-memory file appears whole when its writer closes, so no temporary is needed;
        # the no-replace check above is made before writing (in-process stores only).
        _write_parts(storage.create(name), parts)
        return
    if not isinstance(storage, LocalStorage):
        raise KeepaxError("single-file checkpoints are local files only", path=where)
    with _directory_lock(os.path.dirname(os.path.join(storage.root, name))) as locked:
        if locked:
            _remove_stale_temps(storage, name)
        temp = f"{name}{_TEMP_TAG}{uuid.uuid4().hex[:12]}"
        try:
            _write_parts(storage.create(temp), parts)  # fsynced on close
            source, target = os.path.join(storage.root, temp), os.path.join(storage.root, name)
            if overwrite:
                os.replace(source, target)
            else:
                try:
                    storage.rename_dir(temp, name)  # renameat2(RENAME_NOREPLACE); works on files
                except FileExistsError as e:
                    raise CheckpointExistsError(
                        "another save created this file first; pass overwrite=True to replace "
                        "it",
                        path=where,
                    ) from e
            storage.sync_dir("")
        except BaseException:
            try:
                storage.delete(temp)
            except OSError:
                pass  # A leftover temporary is hidden; the next save_file here removes it.
            raise


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[bool]:
    """Holds an exclusive ``flock`` on a directory: ``save_file``s into one directory write one
    at a time, so a temporary found while holding it is a crashed save's. The kernel releases
    the lock of a process that dies. Where directories cannot be locked (some network file
    systems), saves go ahead unlocked (yielding False) and leave stale temporaries alone."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False  # the directory is missing: storage.create makes it; it holds no temporary
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = -1
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _remove_stale_temps(storage: Storage, name: str) -> None:
    """Deletes the temporaries (``<name>.keepax-tmp-<12 hex>`` files) of crashed saves of
    ``name``. Called with the directory locked (see :func:`_directory_lock`)."""
    parent, _, base = name.rpartition("/")
    for entry in storage.list(parent):
        if entry.startswith(base) and _TEMP_RE.fullmatch(entry[len(base):]):
            path = f"{parent}/{entry}" if parent else entry
            if not storage.is_dir(path):  # directory staging belongs to keepax.save
                try:
                    storage.delete(path)
                except OSError:
                    pass  # not ours to insist on: it stays hidden


def _write_parts(writer: Writer, parts: list[memoryview]) -> None:
    try:
        writer.writev(parts)
    except BaseException:
        writer.abort()
        raise
    writer.close()


# ---------------------------------------------------------------------------------------------
# Load.


def load_file(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    partial: bool = False,
    dtype: Any = None,
    with_metadata: bool = False,
) -> Any:
    """Loads a file written by :func:`save_file`.

    ``like``, ``select``, ``partial`` and ``dtype`` mean exactly what they mean for
    :func:`keepax.restore`: with ``like``, the same structure comes back, arrays as the
    ``like`` leaf's kind (``jax.Array`` placed on its sharding, or NumPy), strictly checked;
    without it, nested dicts, lists and tuples of NumPy arrays and Python values. Every chunk
    read is checked against its CRC-32C.

    Args:
      path: The file: a local path (or ``memory://store/name``).
      like: Optional template tree (see :func:`keepax.restore`).
      select: Load only these subtrees (``"params/dense"`` or tuples of keys).
      partial: With ``like``, allow the file to hold leaves ``like`` lacks.
      dtype: ``None``, ``"like"``, or a floating-point dtype to cast to.
      with_metadata: Return ``(tree, metadata)``: also the ``metadata`` given to
        :func:`save_file` (``{}`` if none was).

    Returns:
      The loaded tree, or ``(tree, metadata)`` with ``with_metadata``.

    Raises:
      CheckpointNotFoundError: no file at ``path`` (or a directory).
      CorruptCheckpointError: the file is damaged (truncated, bad header, checksum mismatch,
        naming the leaf) or is not a keepax single-file checkpoint.
      FormatVersionError: the file was written by a newer major version of the format.
      TreeMismatchError: ``like`` does not match; the message lists every offending leaf.
    """
    storage, name, where = _locate(path)
    reader = _open_file(storage, name, where)
    try:
        manifest = _read_manifest(reader, name, where)
        tree_ = restoring.restore_manifest(
            _ThisFile(reader, storage.url, name),
            name,
            where,
            manifest,
            like,
            select=select,
            partial=partial,
            dtype=dtype,
        )
    finally:
        reader.close()
    return (tree_, manifest.metadata) if with_metadata else tree_


def inspect_file(path: str | os.PathLike[str]) -> inspection.CheckpointInfo:
    """Describes a single-file checkpoint as :func:`keepax.inspect` describes a directory:
    structure, shapes, dtypes, sizes and the metadata given to :func:`save_file`, without
    reading array data.

    Raises:
      CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError: as
        :func:`load_file`.
    """
    storage, name, where = _locate(path)
    reader = _open_file(storage, name, where)
    try:
        manifest = _read_manifest(reader, name, where)
    finally:
        reader.close()
    return inspection.info_of(opening.opened_manifest(storage, name, where, manifest))


def _open_file(storage: Storage, name: str, where: str) -> Reader:
    """Opens a single-file checkpoint, refusing temporaries and directories."""
    if is_hidden_name(name):
        raise CheckpointNotFoundError(
            "this is the temporary file of a save_file that has not finished, never a "
            "checkpoint",
            path=where,
        )
    if storage.is_dir(name):
        raise CheckpointNotFoundError(
            "this is a directory, not a single-file checkpoint; restore checkpoint directories "
            "with keepax.restore",
            path=where,
        )
    try:
        return storage.open(name)
    except FileNotFoundError:
        raise CheckpointNotFoundError("the file does not exist", path=where) from None


def _corrupt(message: str, where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{message}; the file is damaged or is not a keepax single-file checkpoint", path=where
    )


def _read_manifest(reader: Reader, name: str, where: str) -> Manifest:
    """Reads and checks the header; returns the manifest with the file itself as file 0."""
    size = reader.size()
    try:
        length, doc = format.read_header(reader, size)
    except ValueError as e:
        raise _corrupt(str(e), where) from e
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise _corrupt("the safetensors header has no __metadata__", where)
    kind = meta.get("format")
    if kind != FILE_FORMAT_NAME:
        hint = (
            " (a data file of a keepax checkpoint directory: restore the directory with "
            "keepax.restore)"
            if kind == "keepax"
            else ""
        )
        raise _corrupt(f"format is {kind!r:.40}, expected {FILE_FORMAT_NAME!r}{hint}", where)
    _check_version(meta.get("format_version"), where)
    text, crc = meta.get("manifest"), meta.get("manifest_crc32c")
    if not (isinstance(text, str) and isinstance(crc, str) and _CRC_RE.fullmatch(crc)):
        raise _corrupt("__metadata__ lacks the manifest or its manifest_crc32c", where)
    try:
        manifest_bytes = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _corrupt(f"the manifest is not valid text ({e})", where) from e
    if format.checksum(manifest_bytes) != int(crc):
        raise _corrupt("the manifest does not match its checksum (modified?)", where)
    manifest = Manifest.from_json(manifest_bytes, where=where)
    if len(manifest.files) != 1 or manifest.files[0].name != SELF_NAME:
        raise _corrupt(f"the manifest must list exactly one file, {SELF_NAME!r}", where)
    if manifest.files[0].nbytes != size:
        raise _corrupt(
            f"the file has {size} bytes, its manifest says {manifest.files[0].nbytes} "
            "(truncated or extended)",
            where,
        )
    for leaf in manifest.leaves:
        if isinstance(leaf, ArrayLeaf) and any(c.offset < 8 + length for c in leaf.chunks):
            raise CorruptCheckpointError(
                "a chunk lies inside the header; the file is damaged", path=where, leaf=leaf.path
            )
    # From here the file is known by its own name (in messages and to _ThisFile).
    return dataclasses.replace(manifest, files=(DataFile(name, size),))


def _check_version(text: Any, where: str) -> None:
    version = spec.parse_version(text)
    if version is None:
        raise _corrupt(f"format_version must be 'MAJOR.MINOR', got {text!r:.40}", where)
    if version[0] > FILE_FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"written in keepax single-file format {text}, but this keepax reads format "
            f"{FILE_FORMAT_VERSION[0]}.x only; upgrade keepax to read it",
            path=where,
        )
    if version[0] < 1:
        raise FormatVersionError(f"unknown keepax single-file format version {text}", path=where)


class _BytesReader(Reader):
    """Bytes in memory, read as a file."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read_into(self, offset: int, out: memoryview) -> int:
        part = self._data[offset:offset + len(out)]
        out[: len(part)] = part
        return len(part)

    def size(self) -> int:
        return len(self._data)


class _Borrowed(Reader):
    """The open file, lent to the shared reading code (which closes what it opens)."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    def read_into(self, offset: int, out: memoryview) -> int:
        return self._reader.read_into(offset, out)

    def size(self) -> int:
        return self._reader.size()


class _ThisFile(Storage):
    """A read-only view of one open file as a checkpoint directory ``name`` whose only data
    file (``name/name``) is the file itself: how the directory format's reading code reads a
    single file. Every read goes to the same open file, so a concurrent overwrite (a rename)
    cannot mix two versions."""

    def __init__(self, reader: Reader, url: str, name: str) -> None:
        self._reader, self._path, self.url = reader, f"{name}/{name}", url

    def open(self, path: str) -> Reader:
        if path != self._path:
            raise FileNotFoundError(path)
        return _Borrowed(self._reader)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a single-file checkpoint is read-only here")

    create = exists = is_dir = list = delete = rename_dir = _read_only


def inspect(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> inspection.CheckpointInfo:
    """Describes a checkpoint without reading array data: a checkpoint directory (or URL), or
    a single file written by :func:`save_file`.

    Raises:
      CheckpointNotFoundError, NotCommittedError, CorruptCheckpointError, FormatVersionError.
    """
    if os.path.isfile(os.fspath(path)):
        return inspect_file(path)
    return inspection.inspect(os.fspath(path), storage_options=storage_options)
