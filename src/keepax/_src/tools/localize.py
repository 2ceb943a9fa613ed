"""Self-contained copies of steps that refer to a manager's chunk store (incremental saves).

``keepax cp``/``export`` of such a step must not copy references: the copy's data files are
rewritten from the chunks the step really uses (each read once, its CRC-32C checked), with
fresh safetensors headers, and the manifest names them (``data/...``) instead of the store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from keepax._src.checkpoint.handle import Checkpoint
from keepax._src.commit import protocol
from keepax._src.format import datafiles, dtypes, spec, tables
from keepax._src.format.datafiles import ChunkSource
from keepax._src.format.manifest import ArrayLeaf, Chunk, Manifest
from keepax._src.io import Storage
from keepax.errors import CorruptCheckpointError

__all__ = ["has_store_refs", "copy_self_contained"]


def has_store_refs(manifest: Manifest, files: Iterable[str] = ()) -> bool:
    """Whether a manifest refers to data outside its checkpoint (a manager's chunk store);
    ``files``: the data files its chunk tables list, if it has tables."""
    return any(spec.is_store_ref(f.name) for f in manifest.files) or any(
        spec.is_store_ref(f) for f in files)


def _inline(ck: Checkpoint, storage: Storage, name: str) -> Manifest:
    """``ck``'s manifest with every chunk listed in it: a multi-process step's chunk tables
    read in, its leaves' cells, tables and layouts dropped (the copy lists its chunks)."""
    manifest = ck.manifest
    if not manifest.tables:
        return manifest
    manifest = tables.read_tables(storage, name, ck.path, manifest)
    leaves = tuple(dataclasses.replace(leaf, cells=None) if isinstance(leaf, ArrayLeaf)
                   else leaf for leaf in manifest.leaves)
    return dataclasses.replace(manifest, leaves=leaves, tables=(), layouts=())


def _reader(storage: Storage, directory: str, manifest: Manifest, leaf: ArrayLeaf, c: Chunk,
            where: str, done: Callable[[int], None]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if c.codec != "raw":
            raise CorruptCheckpointError(f"codec {c.codec} cannot be copied by this keepax",
                                         path=where, leaf=leaf.path)
        name = manifest.files[c.file].name
        out = np.empty(c.shape, dtypes.dtype_from_name(leaf.dtype))
        view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        reader = storage.open(spec.data_path(directory, name))
        try:
            n = reader.read_into(c.offset, view)
        finally:
            reader.close()
        if n != c.nbytes or datafiles.checksum(view) != c.crc32c:
            raise CorruptCheckpointError(f"a chunk in {name} does not match its checksum; "
                                         "nothing was copied", path=where, leaf=leaf.path)
        done(c.nbytes)
        return out

    return read


def copy_self_contained(ck: Checkpoint, src: Storage, src_name: str, dst: Storage,
                        dst_name: str, *, overwrite: bool, done: Callable[[int], None]) -> Any:
    """Writes ``ck`` at ``dst_name`` with its own data files (none shared); returns the
    bytes written.

    Raises:
      CorruptCheckpointError: a chunk read does not match its checksum.
      CheckpointExistsError: ``dst_name`` exists and ``overwrite`` is false.
    """
    manifest = _inline(ck, src, src_name)
    sources = []
    for index, leaf in enumerate(manifest.leaves):
        if isinstance(leaf, ArrayLeaf):
            for c in leaf.chunks:
                sources.append(ChunkSource(
                    index, datafiles.tensor_name(leaf.path, c.start, c.shape, leaf.shape),
                    c.start, c.shape, dtypes.dtype_from_name(leaf.dtype),
                    _reader(src, src_name, manifest, leaf, c, ck.path, done)))
    with protocol.staged(dst, dst_name, dst.display(dst_name), replace=overwrite) as staging:
        files, written = datafiles.write_data_files(dst, staging.path, sources,
                                                    prefix="p00000")
        if files:
            dst.sync_dir(f"{staging.path}/data")
        digests = {(index, c.start): c.digest for index, leaf in enumerate(manifest.leaves)
                   if isinstance(leaf, ArrayLeaf) for c in leaf.chunks}
        leaves = list(manifest.leaves)
        for index, pairs in written.items():
            leaf = leaves[index]
            assert isinstance(leaf, ArrayLeaf)
            leaves[index] = dataclasses.replace(leaf, chunks=tuple(
                dataclasses.replace(c, digest=digests.get((index, c.start))) for _, c in pairs))
        copy = dataclasses.replace(manifest, files=tuple(files), leaves=tuple(leaves),
                                   created=manifest.created or time.time())
        nbytes = protocol.commit(staging, copy)
    return nbytes + sum(f.nbytes for f in files)
