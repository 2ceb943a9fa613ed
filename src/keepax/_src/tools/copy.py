"""Copy checkpoints, or the steps of a manager directory, between any two storages.

A copy moves the stored bytes as they are (no decoding, no re-chunking), in blocks of a few
MiB, and checks every chunk's CRC-32C on the way (and each chunk table's size and checksum).
The destination's commit protocol is the one every save follows (``docs/FORMAT.md`` §3): data
files are written into a hidden staging directory (rename backends) or in place without a
commit marker (object stores), then the manifest, then the commit marker last, then the
staging directory is renamed into place. So the copy is invisible until complete; a copy that
is killed leaves only hidden staging (removed by ``keepax gc`` or a manager after its grace
period) or, on object stores, a marker-less leftover that the next copy to that name replaces:
running the copy again completes it.

Copying a manager directory copies each selected step as above, skipping steps the destination
already holds with the same manifest, so an interrupted copy of a run resumes step by step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from keepax._src.checkpoint import open_checkpoint
from keepax._src.commit import protocol
from keepax._src.format import datafiles
from keepax._src.format.manifest import COMMIT_FILE, MANIFEST_FILE
from keepax._src.io import Storage, split_checkpoint_path
from keepax._src.tools import _common, localize
from keepax.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeepaxError,
)

__all__ = ["copy", "CopyResult", "add_copy_parser", "run_copy"]

_BLOCK = 8 << 20


@dataclasses.dataclass(frozen=True)
class CopyResult:
    """What :func:`copy` did.

    Attributes:
      copied: Destination paths of the checkpoints copied.
      skipped: Destination paths already holding the same checkpoint (manager copies).
      nbytes: Bytes copied.
    """

    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the result."""
        return {"copied": list(self.copied), "skipped": list(self.skipped),
                "nbytes": self.nbytes}


@dataclasses.dataclass
class _Counter:
    total: int
    done: int = 0
    report: Callable[[int, int], None] | None = None

    def add(self, n: int) -> None:
        self.done += n
        if self.report is not None:
            self.report(self.done, self.total)


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


class _ChunkChecker:
    """Checks the CRC-32C of every chunk of one data file as its bytes stream past."""

    def __init__(self, chunks: Iterable[Any], where: str, file: str) -> None:
        self.chunks = sorted(chunks, key=lambda c: c.offset)
        self.where, self.file = where, file
        self.next, self.crc = 0, 0

    def feed(self, offset: int, block: memoryview) -> None:
        end = offset + len(block)
        while self.next < len(self.chunks):
            chunk = self.chunks[self.next]
            chunk_end = chunk.offset + chunk.nbytes
            lo, hi = max(chunk.offset, offset), min(chunk_end, end)
            if lo >= end:
                return
            if hi > lo:
                self.crc = datafiles.checksum(block[lo - offset:hi - offset], self.crc)
            if chunk_end > end:
                return
            if self.crc != chunk.crc32c:
                raise CorruptCheckpointError(
                    f"chunk {chunk.box} in {self.file} (bytes {chunk.offset}-{chunk_end}) does "
                    "not match its checksum; the source is damaged, nothing was committed at "
                    "the destination",
                    path=self.where, leaf=chunk.leaf,
                )
            self.next, self.crc = self.next + 1, 0

    def finish(self) -> None:
        if self.next < len(self.chunks):
            chunk = self.chunks[self.next]
            raise CorruptCheckpointError(
                f"{self.file} ends before chunk {chunk.box} does (truncated)",
                path=self.where, leaf=chunk.leaf,
            )


def _copy_file(src: Storage, src_path: str, dst: Storage, dst_path: str, nbytes: int,
               check: _ChunkChecker | None, whole_crc: int | None, counter: _Counter) -> None:
    reader = src.open(src_path)
    try:
        if reader.size() != nbytes:
            raise CorruptCheckpointError(
                f"{src_path} holds {reader.size()} bytes where the manifest says {nbytes}",
                path=check.where if check else src.display(src_path),
            )
        writer = dst.create(dst_path)
        try:
            buffer = memoryview(bytearray(min(_BLOCK, max(nbytes, 1))))
            crc = 0
            for offset, length in _common.chunked(nbytes, _BLOCK):
                block = buffer[:length]
                if reader.read_into(offset, block) != length:
                    raise CorruptCheckpointError(f"{src_path} is shorter than its manifest says",
                                                 path=src.display(src_path))
                if check is not None:
                    check.feed(offset, block)
                if whole_crc is not None:
                    crc = datafiles.checksum(block, crc)
                writer.write(block)
                counter.add(length)
            if check is not None:
                check.finish()
            if whole_crc is not None and crc != whole_crc:
                raise CorruptCheckpointError(f"{src_path} does not match its checksum",
                                             path=src.display(src_path))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        reader.close()


def _read_commit(storage: Storage, name: str, ck: Any) -> tuple[bytes, bytes]:
    """The source's commit marker and manifest bytes, checked against each other and against
    the manifest ``ck`` was opened with (the source was not replaced meanwhile)."""
    marker = storage.read_bytes(f"{name}/{COMMIT_FILE}")
    manifest = storage.read_bytes(f"{name}/{MANIFEST_FILE}")
    try:
        fields = json.loads(marker)
        created = json.loads(manifest).get("created")
    except ValueError:
        fields, created = {}, None
    if (len(manifest) != fields.get("manifest_nbytes")
            or datafiles.checksum(manifest) != fields.get("manifest_crc32c")
            or created != ck.info.created):
        raise CorruptCheckpointError("the checkpoint changed while it was being copied (it was "
                                     "overwritten?); copy it again", path=ck.path)
    return marker, manifest


def _copy_one(src: str, dst: str, *, overwrite: bool, report: Callable[[int, int], None] | None,
              src_options: dict[str, Any] | None, dst_options: dict[str, Any] | None) -> int:
    """Copies one committed checkpoint; returns the bytes copied."""
    ck = open_checkpoint(src, storage_options=src_options)
    src_storage, src_name = split_checkpoint_path(src, src_options)
    dst_storage, dst_name = split_checkpoint_path(dst, dst_options)
    where = dst_storage.display(dst_name)
    tables = {t.name: t for t in getattr(ck.manifest, "tables", ())}
    chunks: dict[str, list[Any]] = {}
    for chunk in ck.chunks():
        chunks.setdefault(chunk.file, []).append(chunk)
    files = list(ck.info.files)
    counter = _Counter(sum(n for _, n in files), report=report)
    if localize.has_store_refs(ck.manifest, chunks):  # incremental: rewrite, never refer
        try:
            localize.copy_self_contained(ck, src_storage, src_name, dst_storage, dst_name,
                                         overwrite=overwrite, done=counter.add)
        except FileExistsError as e:
            raise CheckpointExistsError("a checkpoint (or file) already exists here; pass "
                                        "overwrite=True (CLI: --overwrite) to replace it",
                                        path=where) from e
        return counter.done
    staging = dst_storage.staging_name(dst_name)
    try:
        protocol.begin_write(dst_storage, dst_name, replace=overwrite)
    except FileExistsError as e:
        raise CheckpointExistsError("a checkpoint (or file) already exists here; pass "
                                    "overwrite=True (CLI: --overwrite) to replace it",
                                    path=where) from e
    try:
        marker, manifest = _read_commit(src_storage, src_name, ck)
        for name, nbytes in files:
            table = tables.get(name)
            check = None if table else _ChunkChecker(chunks.get(name, ()), ck.path, name)
            _copy_file(src_storage, f"{src_name}/{name}", dst_storage, f"{staging}/{name}",
                       nbytes, check, table.crc32c if table else None, counter)
        if files:
            dst_storage.sync_dir(f"{staging}/data")
        dst_storage.write_bytes(f"{staging}/{MANIFEST_FILE}", manifest)
        dst_storage.write_bytes(f"{staging}/{COMMIT_FILE}", marker)
        try:
            dst_storage.commit(staging, dst_name, replace=overwrite)
        except FileExistsError as e:
            raise CheckpointExistsError("another writer created this checkpoint first",
                                        path=where) from e
    except BaseException:
        if dst_storage.atomic_rename:
            with contextlib.suppress(OSError):
                dst_storage.delete(staging)
        raise
    return counter.done


def _same_checkpoint(src: str, dst: str, src_options: dict[str, Any] | None,
                     dst_options: dict[str, Any] | None) -> bool | None:
    """Whether ``dst`` holds a committed copy of ``src`` (same commit marker); None when
    there is no committed checkpoint at ``dst``."""
    try:
        open_checkpoint(dst, storage_options=dst_options)
    except KeepaxError:
        return None
    s_storage, s_name = split_checkpoint_path(src, src_options)
    d_storage, d_name = split_checkpoint_path(dst, dst_options)
    return (s_storage.read_bytes(f"{s_name}/{COMMIT_FILE}")
            == d_storage.read_bytes(f"{d_name}/{COMMIT_FILE}"))


def _manager_steps(src: str, steps: Sequence[int] | None,
                   options: dict[str, Any] | None) -> list[Any]:
    from keepax._src.manager.manager import CheckpointManager  # noqa: PLC0415 - higher layer

    with CheckpointManager(src, read_only=True, storage_options=options) as manager:
        held = manager.all_steps()
        wanted = held if steps is None else sorted(set(steps))
        missing = [s for s in wanted if s not in held]
        if missing:
            raise CheckpointNotFoundError(
                f"step(s) {missing} are not in this directory; it holds {held}", path=src)
        return [manager.metadata(s) for s in wanted]


def copy(
    src: str,
    dst: str,
    *,
    all_steps: bool = False,
    steps: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
) -> CopyResult:
    """Copies a checkpoint, or steps of a manager directory, verifying every chunk.

    Args:
      src: A checkpoint (path or URL), or with ``all_steps``/``steps`` a manager directory.
      dst: Where the checkpoint goes (it must not exist, unless ``overwrite``), or the
        destination manager directory (steps keep their directory names).
      all_steps: Copy every step of the manager directory ``src``.
      steps: Copy these steps of the manager directory ``src``.
      overwrite: Replace existing checkpoints at the destination (atomically on rename
        backends; on object stores the old one is deleted first).
      progress: Called with (bytes copied, bytes to copy) of the checkpoint being copied.
      storage_options: For URLs, as for :func:`keepax.save`.
      dst_storage_options: For a destination URL, if it needs other options than ``src``.

    Returns:
      What was copied and what was already there.

    Raises:
      CheckpointExistsError: ``dst`` exists and ``overwrite`` is false (a step already held
        with the same manifest is skipped instead).
      CorruptCheckpointError: a source chunk does not match its checksum (nothing is
        committed at the destination).
    """
    dst_options = dst_storage_options if dst_storage_options is not None else storage_options
    if not all_steps and steps is None:
        try:
            n = _copy_one(src, dst, overwrite=overwrite, report=progress,
                          src_options=storage_options, dst_options=dst_options)
        except CheckpointNotFoundError as e:
            e.message += (" (to copy the steps of a manager directory, pass all_steps=True or "
                          "steps=[...]; CLI: --all-steps or --step N)")
            raise
        return CopyResult((dst,), (), n)
    copied, skipped, total = [], [], 0
    for info in _manager_steps(src, steps, storage_options):
        target = _join(dst, info.name)
        same = _same_checkpoint(info.path, target, storage_options, dst_options)
        if same and not overwrite:
            skipped.append(target)
            continue
        if same is False and not overwrite:
            raise CheckpointExistsError(
                f"the destination already holds a different step {info.step} here; pass "
                "overwrite=True (CLI: --overwrite) to replace it", path=target, step=info.step)
        total += _copy_one(info.path, target, overwrite=overwrite or same is not None,
                           report=progress, src_options=storage_options,
                           dst_options=dst_options)
        copied.append(target)
    return CopyResult(tuple(copied), tuple(skipped), total)


# ---------------------------------------------------------------------------------------------
# Command line.


def add_copy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax cp SRC DST [--all-steps | --step N ...] [--overwrite]``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "cp", help="copy a checkpoint or a run's steps between storages (verified)",
        description="Copy a checkpoint (or a manager directory's steps) between local paths, "
                    "memory:// and object stores, checking every chunk's checksum; the "
                    "destination is committed only when complete.")
    parser.add_argument("src", help="checkpoint, or manager directory with --all-steps/--step")
    parser.add_argument("dst", help="destination checkpoint, or manager directory")
    parser.add_argument("--all-steps", action="store_true", help="copy every step of SRC")
    parser.add_argument("--step", type=int, action="append", dest="steps", metavar="N",
                        help="copy step N of SRC (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing checkpoints")
    _common.add_common(parser)
    parser.set_defaults(run=run_copy)
    return parser


def run_copy(args: argparse.Namespace) -> int:
    """Runs ``keepax cp``; returns the exit status (0 done, 2 error)."""

    def body() -> int:
        with _common.Progress("cp", quiet=args.quiet) as bar:
            result = copy(args.src, args.dst, all_steps=args.all_steps, steps=args.steps,
                          overwrite=args.overwrite, progress=bar,
                          storage_options=_common.storage_options(args))
        if args.json:
            _common.print_json(result.to_json())
            return 0
        for path in result.skipped:
            print(f"already there  {path}")
        for path in result.copied:
            print(f"copied         {path}")
        print(f"{len(result.copied)} copied, {len(result.skipped)} already there, "
              f"{_common.format_size(result.nbytes)}")
        return 0

    return _common.run_cli("cp", body)
