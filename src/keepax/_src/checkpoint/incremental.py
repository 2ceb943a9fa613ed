"""Incremental saves: a manager directory's chunk store and the saves that use it.

A manager with ``incremental=True`` writes each step's new chunks into data files of the
directory's shared chunk store, ``<directory>/.keepax-store/data/``, and a chunk whose content
digest (with its size and dtype) matches one a committed step already refers to is not written
again: the new step's manifest names the stored copy (``../.keepax-store/data/<file>``,
``docs/FORMAT.md`` §15). Every step stays a checkpoint on its own (``keepax.restore`` on the
step's path reads the store beside it).

:class:`ChunkStore` keeps, in memory, which store files each committed step refers to
(reference counts derived from the manifests when the manager starts, kept up to date at every
commit and deletion) and the digests of their chunks. Store files are deleted only when no
committed step refers to them and no save in flight has chosen to refer to them; data that a
crash left unreferenced is removed when a manager next starts (after the grace period) or by
``keepax gc``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from keepax._src.commit import protocol
from keepax._src.commit.protocol import SaveResult
from keepax._src.format import datafiles, digests, dtypes, spec
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import MANIFEST_FILE, ArrayLeaf, Chunk, DataFile, Manifest
from keepax._src.io import Storage
from keepax.errors import KeepaxError, KeepaxWarning


class PreparedSave(Protocol):
    """What :func:`write_incremental` reads of a prepared save (``saving.PreparedSave``,
    which imports this module)."""

    @property
    def storage(self) -> Storage: ...

    @property
    def name(self) -> str: ...

    @property
    def where(self) -> str: ...

    @property
    def overwrite(self) -> bool: ...

    @property
    def compression(self) -> Any: ...

    @property
    def metadata(self) -> dict[str, Any]: ...

    @property
    def plan(self) -> Any: ...

__all__ = ["ChunkStore", "StoredChunk", "write_incremental", "STORE_DATA", "store_files"]

STORE_DATA = f"{spec.STORE_DIR}/data"
"""The store's data files, relative to the manager directory."""

_REF = "../"

Key = tuple[str, int, str]
"""(digest, logical nbytes, dtype name): what makes two chunks the same bytes."""


@dataclasses.dataclass(frozen=True)
class StoredChunk:
    """Where a chunk's bytes already are in the store.

    Attributes:
      file: The store file, relative to the manager directory (``.keepax-store/data/...``).
      file_nbytes: That file's size.
      offset, stored, crc32c, codec: As the chunk entry that first recorded them.
    """

    file: str
    file_nbytes: int
    offset: int
    stored: int
    crc32c: int
    codec: str


def store_files(manifest: Manifest) -> set[str]:
    """The store files (relative to the manager directory) a manifest refers to."""
    return {f.name[len(_REF):] for f in manifest.files if spec.is_store_ref(f.name)}


class ChunkStore:
    """Reference counts and digests of a manager directory's chunk store (one process).

    Args:
      storage: The manager directory's storage.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._steps: dict[str, set[str]] = {}  # step name -> store files it refers to
        self._refs: dict[str, int] = {}  # store file -> committed steps referring to it
        self._pins: dict[str, int] = {}  # store file -> saves in flight referring to it
        self._chunks: dict[Key, StoredChunk] = {}
        self._by_file: dict[str, set[Key]] = {}

    # -- bookkeeping -------------------------------------------------------------------------

    def track(self, name: str) -> None:
        """Reads committed step ``name``'s manifest and counts its references.

        Raises:
          KeepaxError: The manifest cannot be read (the step is then not counted; the manager
            refuses to delete store data while it cannot tell who refers to it).
        """
        try:
            data = self._storage.read_bytes(f"{name}/{MANIFEST_FILE}")
            manifest = Manifest.from_json(data, where=self._storage.display(name))
        except (OSError, KeepaxError) as e:
            raise KeepaxError(f"cannot read the manifest of step {name} to count its chunk "
                              f"store references: {e}", path=self._storage.display(name)) from e
        self.register(name, manifest)

    def register(self, name: str, manifest: Manifest) -> list[str]:
        """Counts committed step ``name``'s references (replacing an earlier step of that
        name); returns store files no longer referred to (the caller deletes them)."""
        files = store_files(manifest)
        with self._lock:
            old = self._steps.pop(name, set())
            self._steps[name] = files
            for f in files:
                self._refs[f] = self._refs.get(f, 0) + 1
            for leaf in manifest.leaves:
                if not isinstance(leaf, ArrayLeaf):
                    continue
                for c in leaf.chunks:
                    self._learn(manifest.files[c.file], c, leaf.dtype)
            return self._drop(old)

    def _learn(self, entry: DataFile, c: Chunk, dtype: str) -> None:
        if c.digest is None or not spec.is_store_ref(entry.name):
            return
        file = entry.name[len(_REF):]
        key = (c.digest, c.nbytes, dtype)
        if key not in self._chunks:
            self._chunks[key] = StoredChunk(file, entry.nbytes, c.offset, c.stored, c.crc32c,
                                            c.codec)
            self._by_file.setdefault(file, set()).add(key)

    def _drop(self, files: Iterable[str]) -> list[str]:
        """Under the lock: decrements ``files``; forgets and returns those now dead."""
        dead = []
        for f in files:
            self._refs[f] = self._refs.get(f, 1) - 1
            if self._refs[f] <= 0 and not self._pins.get(f):
                dead.append(f)
        for f in dead:
            self._refs.pop(f, None)
            for key in self._by_file.pop(f, set()):
                self._chunks.pop(key, None)
        return dead

    def release(self, name: str) -> list[str]:
        """Forgets step ``name`` (hidden or deleted); returns store files no longer referred
        to by any committed step or save in flight (the caller deletes them)."""
        with self._lock:
            return self._drop(self._steps.pop(name, set()))

    def referenced(self) -> set[str]:
        """Store files referred to by a committed step or a save in flight."""
        with self._lock:
            return {f for f, n in self._refs.items() if n > 0} | {
                f for f, n in self._pins.items() if n > 0}

    def lookup(self, key: Key, pinned: set[str]) -> StoredChunk | None:
        """The stored copy of a chunk, pinned (in ``pinned``) until :meth:`unpin`."""
        with self._lock:
            hit = self._chunks.get(key)
            if hit is not None and hit.file not in pinned:
                pinned.add(hit.file)
                self._pins[hit.file] = self._pins.get(hit.file, 0) + 1
            return hit

    def unpin(self, pinned: Iterable[str]) -> list[str]:
        """Releases a save's pins; returns files that were kept only by them."""
        dead = []
        with self._lock:
            for f in pinned:
                self._pins[f] -= 1
                if self._pins[f] <= 0:
                    del self._pins[f]
                    if self._refs.get(f, 0) <= 0:
                        dead.append(f)
            for f in dead:
                self._refs.pop(f, None)
                for key in self._by_file.pop(f, set()):
                    self._chunks.pop(key, None)
        return dead

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, files: Iterable[str]) -> None:
        """Deletes dead store files (quietly if already gone).

        Raises:
          OSError: The storage failed (the files stay; the next start reclaims them).
        """
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                self._storage.delete(f)

    def collect(self, grace: float, *, now: float | None = None) -> list[str]:
        """Deletes store files no committed step refers to and unchanged for ``grace``
        seconds (leftovers of crashed saves and deletions); returns them. Call once every
        committed step is tracked."""
        now = time.time() if now is None else now
        try:
            names = self._storage.list(STORE_DATA)
        except (FileNotFoundError, NotADirectoryError):
            return []
        live = self.referenced()
        removed = []
        for base in names:
            f = f"{STORE_DATA}/{base}"
            if f in live:
                continue
            try:
                modified = self._storage.modified(f)
                if modified is None or now - modified < grace:
                    continue
                self._storage.delete(f)
                removed.append(f)
            except OSError as e:
                warnings.warn(f"could not remove unreferenced chunk store file "
                              f"{self._storage.display(f)}: {e}", KeepaxWarning, stacklevel=2)
        return removed

    def stored_bytes(self) -> int:
        """Bytes of the store files referred to now (for tests and reports)."""
        with self._lock:
            files = [f for f, n in self._refs.items() if n > 0]
        total = 0
        for f in files:
            reader = self._storage.open(f)
            try:
                total += reader.size()
            finally:
                reader.close()
        return total


@dataclasses.dataclass
class _Planned:
    source: ChunkSource
    key: Key
    hit: StoredChunk | None  # the stored copy, or None: written by this save
    fresh: int = -1  # index into the fresh sources when written by this save


def _constant(array: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: array


def _plan(sources: Sequence[ChunkSource], store: ChunkStore, pinned: set[str]
          ) -> tuple[list[_Planned], list[ChunkSource]]:
    """Digests each chunk; looks it up in the store, then among this save's new chunks."""
    planned: list[_Planned] = []
    fresh: list[ChunkSource] = []
    seen: dict[Key, int] = {}
    for s in sources:
        array = s.data()
        if array.shape != s.shape:
            raise ValueError(f"chunk {s.name}: got shape {array.shape}, want {s.shape}")
        array = np.ascontiguousarray(array).reshape(s.shape)  # (0-d arrays stay 0-d)
        key = (digests.digest(array), s.nbytes, dtypes.dtype_name(s.dtype))
        hit = store.lookup(key, pinned)
        p = _Planned(s, key, hit)
        if hit is None:
            if key not in seen:
                seen[key] = len(fresh)
                fresh.append(dataclasses.replace(s, data=_constant(array)))
            p.fresh = seen[key]
        planned.append(p)
    return planned, fresh


def _assemble(planned: Sequence[_Planned], new_files: Sequence[DataFile],
              written: dict[int, list[tuple[ChunkSource, Chunk]]], fresh: Sequence[ChunkSource]
              ) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]]]:
    """The manifest's files (all store references) and each leaf's chunks."""
    by_source: dict[int, Chunk] = {}
    for pairs in written.values():
        for source, chunk in pairs:
            by_source[id(source)] = chunk
    files: list[DataFile] = []
    index: dict[str, int] = {}

    def file_index(name: str, nbytes: int) -> int:
        if name not in index:
            index[name] = len(files)
            files.append(DataFile(_REF + name, nbytes))
        return index[name]

    chunks: dict[int, list[tuple[ChunkSource, Chunk]]] = {}
    for p in planned:
        s = p.source
        if p.hit is not None:
            h = p.hit
            i = file_index(h.file, h.file_nbytes)
            chunk = Chunk(i, h.offset, s.nbytes, s.start, s.shape, h.crc32c, h.codec,
                          None if h.codec == "raw" else h.stored, p.key[0])
        else:
            c = by_source[id(fresh[p.fresh])]
            f = new_files[c.file]
            i = file_index(f"{STORE_DATA}/{f.name[len('data/'):]}", f.nbytes)
            chunk = dataclasses.replace(c, file=i, start=s.start, shape=s.shape,
                                        digest=p.key[0])
        chunks.setdefault(s.leaf, []).append((s, chunk))
    return files, chunks


def write_incremental(prepared: PreparedSave, sources: Sequence[ChunkSource], store: ChunkStore,
                      *, before_commit: Callable[[], None] | None = None) -> SaveResult:
    """Writes a prepared single-process save through the chunk store and commits it.

    Raises:
      CheckpointExistsError: Another save created the checkpoint first.
      OSError: The storage failed; nothing was committed.
    """
    began = time.perf_counter()
    storage = prepared.storage
    if "/" in prepared.name:
        raise KeepaxError("incremental saves write steps directly under the manager directory",
                          path=prepared.where)
    pinned: set[str] = set()
    new_files: list[DataFile] = []
    committed = False
    try:
        planned, fresh = _plan(sources, store, pinned)
        with protocol.staged(storage, prepared.name, prepared.where,
                             replace=prepared.overwrite) as staging:
            new_files, written = datafiles.write_data_files(
                storage, spec.STORE_DIR, fresh, prefix=f"{uuid.uuid4().hex[:16]}-p00000",
                compression=prepared.compression)
            if new_files:
                storage.sync_dir(STORE_DATA)
            files, chunks = _assemble(planned, new_files, written, fresh)
            manifest = prepared.plan.manifest(files, chunks, prepared.metadata,
                                              created=time.time())
            manifest = dataclasses.replace(manifest, version=spec.CODECS_VERSION)
            nbytes = protocol.commit(staging, manifest, before_commit=before_commit)
            committed = True
        store.delete(store.register(prepared.name, manifest))
    finally:
        dead = store.unpin(pinned)
        if not committed:
            dead += [f"{spec.STORE_DIR}/{f.name}" for f in new_files]
        with contextlib.suppress(OSError):
            store.delete(dead)
    nbytes += sum(f.nbytes for f in new_files)
    return SaveResult(prepared.where, nbytes, len(new_files), time.perf_counter() - began)
