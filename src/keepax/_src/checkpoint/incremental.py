"""Incremental saves: a manager directory's chunk store and the saves that use it.

A manager with ``incremental=True`` writes each step's new chunks into data files of the
directory's shared chunk store, ``<directory>/.keepax-store/data/``, and a chunk whose content
digest (with its size and dtype) matches one a committed step already refers to is not written
again: the new step's manifest names the stored copy (``../.keepax-store/data/<file>``,
``docs/FORMAT.md`` §15). Every step stays a checkpoint on its own (``keepax.restore`` on the
step's path reads the store beside it).

A save hashes its chunks in order while writer threads write the new ones, a store file per
pack of them, so that hashing overlaps writing; each chunk is read once, and at most
``_IN_FLIGHT`` bytes of new chunks wait for their writer (a non-contiguous chunk is never
copied whole: hashing and writing copy it out in bounded blocks). The chunks of a
``jax.Array`` that is the very object (alive, not deleted) of the previous save are not hashed
again: jax arrays are immutable, so their digests still hold (a hint only; anything else is
hashed).

:class:`ChunkStore` keeps, in memory, which store files each committed step refers to
(reference counts derived from the manifests when the manager starts, kept up to date at every
commit and deletion) and the digests of their chunks. Store files are deleted only when no
committed step refers to them and no save in flight has chosen to refer to them; data that a
crash left unreferenced is removed when a manager next starts (after the grace period) or by
``keepax gc``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from keepax._src.commit import protocol
from keepax._src.commit.protocol import SaveResult
from keepax._src.format import datafiles, digests, dtypes, spec, tables
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

__all__ = ["ChunkStore", "SharedSave", "StoredChunk", "write_incremental", "STORE_DATA",
           "store_files"]

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

    In a multi-process run every process keeps one: each refers only to store files its own
    process index wrote (the tables of two processes never list the same file, §14.3), and
    only process 0 (``peers`` and ``leader``) deletes. Process 0 never deletes a dead store
    file at once: it announces it to every process when it begins the next save (with the
    staging directory), each process forgets it before choosing what to refer to, and
    process 0 deletes it then if no committed step has referred to it meanwhile (see
    :meth:`announce`).

    Args:
      storage: The manager directory's storage.
      process: In a multi-process run, this process's index (None: alone; refers to any
        store file).
      leader: Whether this process counts every process's references and deletes (alone, or
        process 0); another process reads only its own chunk tables.
    """

    def __init__(self, storage: Storage, *, process: int | None = None,
                 leader: bool = True) -> None:
        self._storage = storage
        self._process = process
        self._leader = leader
        self._doomed: set[str] = set()  # dead files process 0 deletes once announced
        self._lock = threading.Lock()
        self._steps: dict[str, set[str]] = {}  # step name -> store files it refers to
        self._refs: dict[str, int] = {}  # store file -> committed steps referring to it
        self._pins: dict[str, int] = {}  # store file -> saves in flight referring to it
        self._chunks: dict[Key, StoredChunk] = {}
        self._by_file: dict[str, set[Key]] = {}
        self.hints = _Hints()
        """The previous save's jax.Array leaves and their chunk keys (never hashed again)."""

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
            if manifest.tables:  # a multi-process step: its chunks are in its tables
                mine = None if self._leader or self._process is None else {self._process}
                manifest = tables.read_tables(self._storage, name, self._storage.display(name),
                                              manifest, mine)
        except (OSError, KeepaxError) as e:
            raise KeepaxError(f"cannot read the manifest of step {name} to count its chunk "
                              f"store references: {e}", path=self._storage.display(name)) from e
        self.register(name, manifest)

    def register(self, name: str, manifest: Manifest) -> list[str]:
        """Counts committed step ``name``'s references (replacing an earlier step of that
        name); returns store files no longer referred to (the caller deletes them)."""
        learned = ((manifest.files[c.file], c, leaf.dtype) for leaf in manifest.leaves
                   if isinstance(leaf, ArrayLeaf) for c in leaf.chunks)
        return self.register_files(name, store_files(manifest), learned)

    def register_files(self, name: str, files: set[str],
                       learned: Iterable[tuple[DataFile, Chunk, str]]) -> list[str]:
        """As :meth:`register`, given the store files step ``name`` refers to and its chunks
        (file entry, chunk, dtype name) whose digests to learn."""
        with self._lock:
            old = self._steps.pop(name, set())
            self._steps[name] = files
            for f in files:
                self._refs[f] = self._refs.get(f, 0) + 1
            for entry, c, dtype in learned:
                self._learn(entry, c, dtype)
            return self._drop(old)

    def _learn(self, entry: DataFile, c: Chunk, dtype: str) -> None:
        if c.digest is None or not spec.is_store_ref(entry.name):
            return
        file = entry.name[len(_REF):]
        if self._process is not None and f"-p{self._process:05d}-" not in file:
            return  # another process's file: only it may list it (§14.3)
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
        self._forget(dead)
        return dead

    def _forget(self, files: Iterable[str]) -> None:
        """Under the lock: forgets dead store files and the chunks they held."""
        for f in files:
            self._refs.pop(f, None)
            for key in self._by_file.pop(f, set()):
                self._chunks.pop(key, None)

    def release(self, name: str) -> list[str]:
        """Forgets step ``name`` (hidden or deleted); returns store files no longer referred
        to by any committed step or save in flight (the caller deletes them)."""
        with self._lock:
            return self._drop(self._steps.pop(name, set()))

    def empty(self) -> bool:
        """Whether no chunk is known to be stored (nothing to refer to)."""
        with self._lock:
            return not self._chunks

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
            self._forget(dead)
        return dead

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, files: Iterable[str]) -> None:
        """Deletes dead store files (quietly if already gone); in a multi-process run, notes
        them for process 0 to announce and delete at the next save (:meth:`announce`).

        Raises:
          OSError: The storage failed (the files stay; the next start reclaims them).
        """
        if self._process is not None:
            if self._leader:
                with self._lock:
                    self._doomed.update(files)
            return
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                self._storage.delete(f)

    def announce(self) -> list[str]:
        """Process 0, beginning a multi-process save: the dead files to announce (deleted by
        :meth:`heard` once every process has been told, unless referred to again)."""
        with self._lock:
            return sorted(self._doomed)

    def heard(self, files: Sequence[str]) -> None:
        """Every process, before choosing what a multi-process save refers to: forgets the
        chunks of ``files``; process 0 then deletes those no committed step or save of its
        own refers to (each other process has finished its previous save, whose references
        process 0 counted when it committed, and refers to none of them any more).

        Raises:
          OSError: The storage failed (the files stay; the next start reclaims them).
        """
        with self._lock:
            for f in files:
                for key in self._by_file.pop(f, set()):
                    self._chunks.pop(key, None)
            if not self._leader:
                return
            self._doomed.difference_update(files)
            dead = [f for f in files if self._refs.get(f, 0) <= 0 and not self._pins.get(f)]
        for f in dead:
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
    key: Key  # (its digest is known only once written when ``tap`` is set)
    hit: StoredChunk | None  # the stored copy, or None: written by this save
    fresh: int = -1  # index into the fresh sources when written by this save
    tap: digests.Streaming | None = None  # written without hashing first: digested writing


_PACK_DIV, _PACK_MIN, _PACK_MAX = 8, 16 << 20, 256 << 20
"""Bytes of new chunks per store file: 1/_PACK_DIV of the save's bytes within these bounds.
Each file is written (by a pool of threads) while the chunks after it are hashed."""
_WRITERS = 4  # store files written at once (one for compressed saves: they use every core)
_IN_FLIGHT = 256 << 20  # bytes of new chunks handed to writers and not written yet

_Written = dict[int, tuple[DataFile, Chunk]]
"""id of a fresh source -> the file (as written under the store) and its chunk entry."""

_HintKey = tuple[tuple[int, ...], tuple[int, ...]]
_Where = tuple[str, tuple[int, ...], str]
"""A chunk's place in the state: tensor name (leaf path and start), shape, dtype name."""
_FUSE_MIN = 1 << 20  # smaller chunks are always hashed before they are written


class _Hints:
    """The chunk keys of the ``jax.Array`` leaves of a manager's previous save, by object.

    A jax.Array is immutable: the same object, not deleted (donated), still holds the bytes it
    held then, so its chunks need not be hashed again. Only a weak reference is kept; an
    object that died (its id may be reused) or was deleted is hashed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, tuple[weakref.ref[Any], dict[_HintKey, Key]]] = {}
        self.samples: dict[_Where, int] = {}
        """The previous save's chunk samples (:func:`digests.sample`), by place."""

    def get(self, value: Any, source: ChunkSource) -> Key | None:
        """The key recorded for ``source`` of leaf ``value``, if it is the same live array."""
        if not isinstance(value, jax.Array) or value.is_deleted():
            return None  # not immutable, or donated (reading it fails anyway)
        with self._lock:
            entry = self._by_id.get(id(value))
        if entry is None or entry[0]() is not value:
            return None  # never seen, or a dead object's successor at its address
        key = entry[1].get((source.start, source.shape))
        if key is None or key[1] != source.nbytes or key[2] != dtypes.dtype_name(source.dtype):
            return None
        return key

    def replace(self, keys: dict[int, tuple[Any, dict[_HintKey, Key]]]) -> None:
        """Keeps the keys of one save's jax.Array leaves (id -> (leaf, keys)), dropping the
        previous save's."""
        kept: dict[int, tuple[weakref.ref[Any], dict[_HintKey, Key]]] = {}
        for i, (value, chunks) in keys.items():
            try:
                kept[i] = (weakref.ref(value), chunks)
            except TypeError:
                continue  # not weakly referenceable: no hint
        with self._lock:
            self._by_id = kept


def _leaves(prepared: PreparedSave) -> Sequence[Any]:
    structure = getattr(prepared.plan, "structure", None)
    return getattr(structure, "leaves", ())


class _Streamer:
    """Hashes chunks in order and hands the new ones to writer threads, a store file at a
    time, so that hashing overlaps writing. Each chunk's data is read once (by this thread);
    a new chunk is held only until its file is written, and at most ``_IN_FLIGHT`` bytes of
    them at once (a non-contiguous chunk is held as the view it is: hashing and writing copy
    it out in bounded blocks).

    A chunk predicted to have changed is not hashed first: its writer digests it block by
    block as it writes it (each byte read from memory once, not twice). The prediction is a
    hint only (:meth:`_tap`): a contiguous chunk of at least ``_FUSE_MIN`` bytes, uncompressed,
    whose sample (:func:`digests.sample`) differs from its place's at the previous save, or,
    while the store holds no chunk, any such chunk whose sample no earlier chunk of this save
    had (zero-filled moments are hashed first: one is probably a copy of another). Such a
    chunk that turns out to equal a stored one keeps its new copy (see :meth:`run`)."""

    def __init__(self, prepared: PreparedSave, store: ChunkStore, pinned: set[str],
                 prefix: str, total: int, consume: bool) -> None:
        self.prepared, self.store, self.pinned, self.prefix = prepared, store, pinned, prefix
        self.consume = consume
        self.target = min(max(total // _PACK_DIV, _PACK_MIN), _PACK_MAX)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            1 if prepared.compression is not None else _WRITERS)
        self.pending: collections.deque[tuple[concurrent.futures.Future[_Written], int]] = (
            collections.deque())
        self.files = 0
        self.written: _Written = {}
        self.hashed = 0  # chunks hashed first (the others known from hints, or digested)
        self.fuse = prepared.compression is None
        self.first = store.empty()
        self.samples: dict[_Where, int] = {}
        self.sampled: set[int] = set()

    def _write(self, pack: list[ChunkSource], number: int) -> _Written:
        files, written = datafiles.write_data_files(
            self.prepared.storage, spec.STORE_DIR, pack, prefix=f"{self.prefix}-{number:03d}",
            max_files=1, compression=self.prepared.compression)
        return {id(src): (files[c.file], c) for pairs in written.values() for src, c in pairs}

    def _submit(self, pack: list[ChunkSource], nbytes: int) -> None:
        self.pending.append((self.pool.submit(self._write, pack, self.files), nbytes))
        self.files += 1
        while sum(n for _, n in self.pending) > _IN_FLIGHT:
            self.written.update(self.pending.popleft()[0].result())

    def _tap(self, s: ChunkSource, array: np.ndarray) -> digests.Streaming | None:
        """A digest to feed while ``s`` is written if it is predicted to have changed; None:
        hash it first (it may be stored already)."""
        if not self.fuse or s.nbytes < _FUSE_MIN:
            return None
        sample = digests.sample(array)
        if sample is None:
            return None
        where = (s.name, s.shape, dtypes.dtype_name(s.dtype))
        self.samples[where] = sample
        if sample in self.sampled:
            return None  # probably a copy of an earlier chunk of this save (zeros)
        self.sampled.add(sample)
        before = self.store.hints.samples.get(where)
        return digests.Streaming() if (self.first if before is None else before != sample) \
            else None

    def _key(self, s: ChunkSource, value: Any, hints: _Hints
             ) -> tuple[Key, np.ndarray | None, digests.Streaming | None]:
        key = hints.get(value, s)
        array = s.data() if key is None or self.consume else None
        if array is not None and array.shape != s.shape:
            raise ValueError(f"chunk {s.name}: got shape {array.shape}, want {s.shape}")
        tap = None
        if key is None:
            assert array is not None
            tap = self._tap(s, array)
            digest = "" if tap is not None else digests.digest(array)
            self.hashed += tap is None
            key = (digest, s.nbytes, dtypes.dtype_name(s.dtype))
        return key, array, tap

    def run(self, sources: Sequence[ChunkSource]) -> tuple[list[_Planned], list[ChunkSource]]:
        """Plans every chunk (a stored copy or new), writes the new ones (into
        :attr:`written`); returns the plan and the new chunks.

        A digested chunk (written without hashing first) refers to its new copy even where
        it turns out to equal a stored chunk or another of this save: that copy is complete
        and checksummed, and a store file is reclaimed only whole, so referring elsewhere
        would leave its bytes unreclaimable inside a live file. Its place's sample is then
        unchanged at the next save, which hashes it first again.
        """
        planned: list[_Planned] = []
        fresh: list[ChunkSource] = []
        seen: dict[Key, int] = {}
        pack: list[ChunkSource] = []
        size = 0
        leaves = _leaves(self.prepared)
        hints = self.store.hints
        try:
            for s in sources:
                value = leaves[s.leaf] if s.leaf < len(leaves) else None
                key, array, tap = self._key(s, value, hints)
                hit = None if tap is not None else self.store.lookup(key, self.pinned)
                p = _Planned(s, key, hit, tap=tap)
                if p.hit is None:
                    p.fresh = len(fresh) if tap is not None else seen.setdefault(key, len(fresh))
                    if p.fresh == len(fresh):
                        # Read once: a hinted chunk not read yet is read by its writer.
                        fresh.append(s if array is None else dataclasses.replace(
                            s, data=_constant(array), tap=None if tap is None else tap.update))
                        pack.append(fresh[-1])
                        size += s.nbytes
                        if size >= self.target:
                            self._submit(pack, size)
                            pack, size = [], 0
                planned.append(p)
                del array
            if pack:
                self._submit(pack, size)
            while self.pending:
                self.written.update(self.pending.popleft()[0].result())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._remember(planned, leaves)
        return planned, fresh

    def _remember(self, planned: list[_Planned], leaves: Sequence[Any]) -> None:
        """Completes the digested chunks' keys; keeps this save's hints for the next."""
        remember: dict[int, tuple[Any, dict[_HintKey, Key]]] = {}
        for p in planned:
            if p.tap is not None:
                p.key = (p.tap.value(), *p.key[1:])
            s = p.source
            value = leaves[s.leaf] if s.leaf < len(leaves) else None
            if isinstance(value, jax.Array):
                remember.setdefault(id(value), (value, {}))[1][(s.start, s.shape)] = p.key
        self.store.hints.replace(remember)
        self.store.hints.samples = self.samples


def _constant(array: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: array


def _assemble(planned: Sequence[_Planned], fresh: Sequence[ChunkSource], written: _Written
              ) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]]]:
    """The manifest's files (all store references) and each leaf's chunks."""
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
            f, c = written[id(fresh[p.fresh])]
            i = file_index(f"{STORE_DATA}/{f.name[len('data/'):]}", f.nbytes)
            chunk = dataclasses.replace(c, file=i, start=s.start, shape=s.shape,
                                        digest=p.key[0])
        chunks.setdefault(s.leaf, []).append((s, chunk))
    return files, chunks


def _remove_written(storage: Storage, prefix: str) -> None:
    """Deletes the store files an uncommitted save wrote (named with its unique prefix)."""
    with contextlib.suppress(OSError):
        for base in storage.list(STORE_DATA):
            if base.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    storage.delete(f"{STORE_DATA}/{base}")


def _check_step_name(prepared: PreparedSave) -> None:
    """The store's references (``../.keepax-store/...``) hold for steps directly under the
    manager directory only, which is where a manager writes them."""
    if "/" in prepared.name:
        raise KeepaxError(
            "incremental saves write steps directly under the manager directory, not "
            f"{prepared.name!r}: save this checkpoint with incremental=False (or through "
            "the manager)", path=prepared.where)


def write_incremental(prepared: PreparedSave, sources: Sequence[ChunkSource], store: ChunkStore,
                      *, before_commit: Callable[[], None] | None = None,
                      consume: bool = True) -> SaveResult:
    """Writes a prepared single-process save through the chunk store and commits it.

    Args:
      prepared: The save.
      sources: Its chunks (the plan's, or staged copies).
      store: The manager directory's chunk store.
      before_commit: Called before the commit marker is written.
      consume: Read every chunk once, even one known unchanged without reading it (staged
        copies are released as they are read); False reads only what is hashed or written.

    Raises:
      CheckpointExistsError: Another save created the checkpoint first.
      OSError: The storage failed; nothing was committed.
    """
    began = time.perf_counter()
    storage = prepared.storage
    _check_step_name(prepared)
    pinned: set[str] = set()
    prefix = f"{uuid.uuid4().hex[:16]}-p00000"
    new_files: dict[str, int] = {}
    committed = False
    try:
        with protocol.staged(storage, prepared.name, prepared.where,
                             replace=prepared.overwrite) as staging:
            streamer = _Streamer(prepared, store, pinned, prefix,
                                 sum(s.nbytes for s in sources), consume)
            planned, fresh = streamer.run(sources)
            written = streamer.written
            new_files = {f.name: f.nbytes for f, _ in written.values()}
            if new_files:
                storage.sync_dir(STORE_DATA)
            files, chunks = _assemble(planned, fresh, written)
            manifest = prepared.plan.manifest(files, chunks, prepared.metadata,
                                              created=time.time())
            manifest = dataclasses.replace(
                manifest, version=max(spec.CODECS_VERSION, manifest.version))
            nbytes = protocol.commit(staging, manifest, before_commit=before_commit)
            committed = True
        store.delete(store.register(prepared.name, manifest))
    finally:
        dead = store.unpin(pinned)
        with contextlib.suppress(OSError):
            store.delete(dead)
        if not committed:
            _remove_written(storage, prefix)
    nbytes += sum(new_files.values())
    return SaveResult(prepared.where, nbytes, len(new_files), time.perf_counter() - began)


class SharedSave:
    """One process's part of a multi-process incremental save: the chunk store hooks
    (:class:`~keepax._src.commit.distributed.StoreHooks`) the commit protocol calls.

    The process writes its new chunks into store files named with a fresh prefix and its
    process index (no two processes' names collide) and lists them, and the stored copies it
    refers to, in its chunk tables. A failed save leaves what it wrote (process 0 may have
    committed before a later stage failed elsewhere): the next manager start, or ``keepax
    gc``, reclaims it after the grace period.

    Args:
      prepared: The save (multi-process, into a manager directory).
      store: This process's chunk store.
      process: This process's index.
      consume: As for :func:`write_incremental`.
    """

    def __init__(self, prepared: PreparedSave, store: ChunkStore, process: int, *,
                 consume: bool) -> None:
        _check_step_name(prepared)
        self._prepared, self._store, self._consume = prepared, store, consume
        self._prefix = f"{uuid.uuid4().hex[:16]}-p{process:05d}"
        self._pinned: set[str] = set()
        self._learned: list[tuple[DataFile, Chunk, str]] = []

    def announce(self) -> list[str]:
        return self._store.announce()

    def heard(self, files: list[str]) -> None:
        self._store.heard(files)

    def write(self, sources: Sequence[ChunkSource]
              ) -> tuple[list[DataFile], dict[int, list[tuple[ChunkSource, Chunk]]], int]:
        streamer = _Streamer(self._prepared, self._store, self._pinned, self._prefix,
                             sum(s.nbytes for s in sources), self._consume)
        planned, fresh = streamer.run(sources)
        new = {f.name: f.nbytes for f, _ in streamer.written.values()}
        if new:
            self._prepared.storage.sync_dir(STORE_DATA)
        files, chunks = _assemble(planned, fresh, streamer.written)
        self._learned = [(files[c.file], c, dtypes.dtype_name(s.dtype))
                         for pairs in chunks.values() for s, c in pairs]
        return files, chunks, sum(new.values())

    def committed(self, files: list[str]) -> None:
        refs = {f[len(_REF):] for f in files if spec.is_store_ref(f)}
        try:
            self._store.delete(self._store.register_files(self._prepared.name, refs,
                                                          self._learned))
        finally:
            self._release()

    def abandoned(self) -> None:
        self._release()

    def _release(self) -> None:
        pinned, self._pinned = self._pinned, set()
        self._store.delete(self._store.unpin(pinned))
