"""Export a checkpoint for other tools: Hugging Face safetensors, NumPy ``.npz``, HDF5.

Every format streams: leaves are read one at a time (``Checkpoint.iter_leaves``) and written
as they arrive, so memory holds about one leaf (plus its converted copy, when a conversion is
asked). Shapes and dtypes are known from the manifest before any data is read, so each
safetensors file's header is written first and its tensors' bytes follow.

**Names.** A leaf's name is its key path joined by ``separator`` (``"."``):
``{"params": {"dense": {"kernel": ...}}}`` gives ``params.dense.kernel``; list and tuple
positions are numbers (``layers.0.w``); ``strip_prefix`` (``"params"``) drops leading names.

**Dtypes a format lacks** are an error naming the leaf, unless ``convert=True`` asks for these
lossless conversions (recorded per leaf in :attr:`ExportResult.converted`, and in safetensors'
``__metadata__`` / HDF5 attributes):

- ``int4``/``uint4``/``int2``/``uint2`` become ``int8``/``uint8``;
- float types the format lacks (``float8_*`` variants, ``float4``/``float6``; ``bfloat16`` for
  npz and HDF5) become ``float32``;
- complex arrays become real arrays with a trailing axis of 2 (real, imaginary), like
  ``torch.view_as_real`` (safetensors only: npz and HDF5 store complex numbers);
- typed PRNG keys become their key data (``uint32``).

Python ``str`` leaves have no place in safetensors: they are skipped there (listed in
:attr:`ExportResult.skipped`); npz and HDF5 store them as strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from keepax._src.checkpoint import open_checkpoint
from keepax._src.io import Writer, open_root
from keepax._src.tools import _common
from keepax.errors import KeepaxError, UnsupportedLeafError

__all__ = ["export", "ExportResult", "add_export_parser", "run_export", "FORMATS"]

FORMATS = ("safetensors", "npz", "hdf5")

_SAFETENSORS_CODES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32", "float32": "F32",
    "uint64": "U64", "int64": "I64", "float64": "F64", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
}
_SMALL_INTS = {"int4": np.int8, "int2": np.int8, "uint4": np.uint8, "uint2": np.uint8}
_ML_FLOATS = {name for name in dir(ml_dtypes) if name.startswith(("float8", "float4", "float6"))}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
      format: ``safetensors``, ``npz`` or ``hdf5``.
      files: The files written (paths or URLs), in order; for sharded safetensors the index
        file comes last.
      names: For each exported leaf (by key path), its name in the output.
      converted: For each converted leaf (by key path), ``"<from> -> <to>"``.
      skipped: Leaves not exported, with the reason.
      nbytes: Bytes of tensor data written.
    """

    format: str
    files: tuple[str, ...]
    names: dict[str, str]
    converted: dict[str, str]
    skipped: dict[str, str]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the result."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Entry:
    """One leaf to export: its name, source info and the output dtype/shape."""

    path: str
    parts: tuple[str, ...]
    name: str
    dtype: np.dtype | None  # None: a Python str value
    shape: tuple[int, ...]
    conversion: str | None
    cast: np.dtype | None

    @property
    def nbytes(self) -> int:
        return 0 if self.dtype is None else int(np.prod(self.shape)) * self.dtype.itemsize


def _dtype(name: str) -> np.dtype:
    extra = getattr(ml_dtypes, name, None)
    return np.dtype(extra if isinstance(extra, type) else name)


def _is_float(dtype: np.dtype) -> bool:
    return bool(jax.dtypes.issubdtype(dtype, np.floating))


def _target(leaf: Any, fmt: str, cast: np.dtype | None, convert: bool
            ) -> tuple[np.dtype | None, tuple[int, ...], str | None, np.dtype | None]:
    """Output dtype, shape, conversion text and cast of a leaf (raises if it cannot go)."""
    if leaf.shape is None:
        if leaf.type == "str":
            return None, (), None, None
        stored = np.asarray(leaf.value).dtype
        shape: tuple[int, ...] = ()
    else:
        stored, shape = _dtype(leaf.dtype), tuple(leaf.shape)
    out, conversion = stored, None
    if cast is not None and _is_float(stored) and stored != cast:
        out = cast
    lacking = None
    if leaf.type == "prngkey":
        lacking = "PRNG keys"
        new = out
    elif out.name in _SMALL_INTS:
        lacking, new = out.name, np.dtype(_SMALL_INTS[out.name])
    elif np.issubdtype(out, np.complexfloating) and fmt == "safetensors":
        lacking = out.name
        new = np.dtype(np.float32 if out == np.complex64 else np.float64)
        shape = (*shape, 2)
    elif out.name in _ML_FLOATS or (out.name == "bfloat16" and fmt != "safetensors"):
        if fmt != "safetensors" or out.name not in _SAFETENSORS_CODES:
            lacking, new = out.name, np.dtype(np.float32)
    if lacking is not None:
        if not convert:
            raise UnsupportedLeafError(
                f"{fmt} has no type for {lacking} ({leaf.type} {out.name}); pass convert=True "
                f"(CLI: --convert) to export it as {new.name}, or leave the leaf out with "
                "select=",
                leaf=leaf.path,
            )
        conversion = f"{leaf.type if leaf.type == 'prngkey' else out.name} -> {new.name}"
        if leaf.type != "prngkey" and not np.issubdtype(out, np.complexfloating):
            cast = new
        out = new
    return out, shape, conversion, (out if cast is not None and out != stored else None)


def _matches(parts: tuple[Any, ...], selectors: list[tuple[Any, ...]] | None) -> bool:
    if selectors is None:
        return True
    return any(len(s) <= len(parts) and all(str(a) == str(b) for a, b in zip(s, parts))
               for s in selectors)


def _selectors(select: Any) -> list[tuple[Any, ...]] | None:
    if select is None:
        return None
    items = [select] if isinstance(select, str | tuple) else list(select)
    return [tuple(p for p in s.split("/") if p) if isinstance(s, str) else tuple(s)
            for s in items]


def _plan(info: Any, fmt: str, select: Any, cast: np.dtype | None, convert: bool,
          separator: str, strip_prefix: str | None) -> tuple[list[_Entry], dict[str, str]]:
    parts_of = _common.leaf_parts(info.tree)
    selectors = _selectors(select)
    strip = tuple(p for p in (strip_prefix or "").replace(separator, "/").split("/") if p)
    entries: list[_Entry] = []
    skipped: dict[str, str] = {}
    names: dict[str, str] = {}
    for leaf in info.leaves:
        parts = tuple(str(p) for p in parts_of.get(leaf.path, ()))
        if not _matches(parts, selectors):
            continue
        if strip and parts[: len(strip)] == strip:
            parts = parts[len(strip):]
        dtype, shape, conversion, leaf_cast = _target(leaf, fmt, cast, convert)
        if dtype is None and fmt == "safetensors":
            skipped[leaf.path] = "a str value (safetensors holds tensors only)"
            continue
        name = separator.join(parts) or "root"
        if name in names:
            raise KeepaxError(
                f"leaves {names[name]} and {leaf.path} both export as {name!r}; choose another "
                "separator or strip_prefix",
                path=info.path, leaf=leaf.path,
            )
        names[name] = leaf.path
        entries.append(_Entry(leaf.path, parts or ("root",), name, dtype, shape, conversion,
                              leaf_cast))
    if not entries:
        raise KeepaxError(f"nothing to export (select={select!r})", path=info.path)
    return entries, skipped


def _contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` in C order (a copy only if needed; 0-d arrays stay 0-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _plain_array(value: Any) -> np.ndarray:
    """A leaf value as NumPy: bytes as uint8, typed PRNG keys as their key data."""
    if isinstance(value, bytes):
        return np.frombuffer(value, np.uint8)
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(value))
    return np.asarray(value)


def _value(entry: _Entry, value: Any) -> np.ndarray:
    """The leaf's value as the array to write (converted as planned), C-contiguous."""
    array = _plain_array(value)
    if entry.cast is not None:
        array = array.astype(entry.cast)
    if np.issubdtype(array.dtype, np.complexfloating):
        if entry.dtype is not None and not np.issubdtype(entry.dtype, np.complexfloating):
            array = _contiguous(array).view(entry.dtype).reshape(entry.shape)
    array = _contiguous(array)
    if array.shape != entry.shape or (entry.dtype is not None and array.dtype != entry.dtype):
        raise KeepaxError(
            f"read {array.dtype}{list(array.shape)} where the manifest promised "
            f"{entry.dtype}{list(entry.shape)}", leaf=entry.path,
        )
    return array


# ---------------------------------------------------------------------------------------------
# Writers.


def _safetensors_header(entries: Sequence[_Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to a multiple of 8)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        assert e.dtype is not None  # noqa: S101 - str values were skipped when planning
        header[e.name] = {"dtype": _SAFETENSORS_CODES[e.dtype.name], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class _SafetensorsOut:
    """Writes planned shards one after another as leaves arrive, in plan order."""

    def __init__(self, out: str, entries: list[_Entry], max_bytes: int,
                 metadata: dict[str, str], overwrite: bool,
                 storage_options: dict[str, Any] | None) -> None:
        self.storage = open_root(out, storage_options)
        self.shards = _shards(entries, max_bytes)
        n = len(self.shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.index = "model.safetensors.index.json" if n > 1 else None
        for name in [*self.names, *([self.index] if self.index else [])]:
            if self.storage.exists(name):
                if not overwrite:
                    raise KeepaxError(f"{self.storage.display(name)} exists; pass overwrite=True "
                                      "(CLI: --overwrite) to replace it")
                self.storage.delete(name)
        self.metadata = metadata
        self.shard, self.position = -1, 0
        self.writer: Writer | None = None
        self.entries = entries

    def write(self, entry: _Entry, array: np.ndarray) -> None:
        if self.writer is None or self.position == len(self.shards[self.shard]):
            self._next()
        assert self.writer is not None  # noqa: S101 - _next opened it
        if self.shards[self.shard][self.position] is not entry:
            raise KeepaxError("leaves arrived out of order", leaf=entry.path)
        if array.size:
            self.writer.write(memoryview(array.reshape(-1).view(np.uint8).data))
        self.position += 1

    def _next(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.shard, self.position = self.shard + 1, 0
        self.writer = self.storage.create(self.names[self.shard])
        self.writer.write(memoryview(_safetensors_header(self.shards[self.shard],
                                                         self.metadata)))

    def finish(self) -> list[str]:
        while self.shard < len(self.shards) - 1 or self.writer is None:
            self._next()  # shards of zero-sized tensors only
        assert self.writer is not None  # noqa: S101
        self.writer.close()
        self.writer = None
        files = [self.storage.display(n) for n in self.names]
        if self.index is not None:
            weight_map = {e.name: self.names[i]
                          for i, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": sum(e.nbytes for e in self.entries)},
                     "weight_map": weight_map}
            self.storage.write_bytes(self.index, json.dumps(index, indent=2).encode())
            files.append(self.storage.display(self.index))
        return files

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _local(out: str, fmt: str) -> str:
    if "://" in out and not out.startswith("file://"):
        raise KeepaxError(f"{fmt} export writes local files only, got {out!r}; export to a local "
                          "path and copy it")
    return out.removeprefix("file://")


def _check_new(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise KeepaxError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)


def _write_npz(ck: Any, out: str, entries: list[_Entry], select: Any,
               compress: bool, progress: Any) -> list[str]:
    by_path = {e.path: e for e in entries}
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    done, total = 0, sum(e.nbytes for e in entries)
    with zipfile.ZipFile(out, "w", compression=mode, allowZip64=True) as archive:
        for leaf, value in ck.iter_leaves(select=select):
            entry = by_path.get(leaf.path)
            if entry is None:
                continue
            array = np.asarray(value, dtype=np.str_) if entry.dtype is None else _value(
                entry, value)
            with archive.open(f"{entry.name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            done += entry.nbytes
            progress(done, total)
    return [out]


def _write_hdf5(ck: Any, out: str, entries: list[_Entry], select: Any, progress: Any) -> list[str]:
    try:
        import h5py  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise KeepaxError("HDF5 export needs h5py: pip install keepax[hdf5]") from e
    by_path = {e.path: e for e in entries}
    done, total = 0, sum(e.nbytes for e in entries)
    with h5py.File(out, "w") as f:
        f.attrs["keepax.source"] = ck.path
        f.attrs["keepax.metadata"] = json.dumps(ck.metadata, sort_keys=True)
        for leaf, value in ck.iter_leaves(select=select):
            entry = by_path.get(leaf.path)
            if entry is None:
                continue
            group = f
            for part in entry.parts[:-1]:
                group = group.require_group(part)
            if entry.dtype is None:
                dataset = group.create_dataset(entry.parts[-1], data=str(value),
                                               dtype=h5py.string_dtype())
            else:
                dataset = group.create_dataset(entry.parts[-1], data=_value(entry, value))
            dataset.attrs["keepax.path"] = leaf.path
            dataset.attrs["keepax.type"] = leaf.type
            if entry.conversion:
                dataset.attrs["keepax.converted"] = entry.conversion
            done += entry.nbytes
            progress(done, total)
    return [out]


def export(
    path: str,
    out: str,
    format: str = "safetensors",  # noqa: A002 - the natural name
    *,
    select: str | Sequence[str | tuple[Any, ...]] | None = None,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    separator: str = ".",
    strip_prefix: str | None = None,
    convert: bool = False,
    overwrite: bool = False,
    compress: bool = False,
    progress: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Exports a checkpoint's arrays to safetensors (Hugging Face layout), npz or HDF5.

    Args:
      path: The checkpoint's path or URL.
      out: For safetensors, a directory (or URL) receiving ``model.safetensors``, or
        ``model-00001-of-0000N.safetensors`` files and ``model.safetensors.index.json`` when
        the tensors exceed ``max_shard_size``. For npz and HDF5, a local file path.
      format: ``"safetensors"``, ``"npz"`` or ``"hdf5"``.
      select: Export only these subtrees (as for :func:`keepax.restore`).
      dtype: Cast floating-point leaves to this dtype (e.g. ``"bfloat16"``).
      max_shard_size: Most tensor bytes per safetensors file (``"5GB"`` = 5·10⁹, ``"2GiB"``).
        A tensor larger than it gets a file of its own.
      separator: Joins the names of a leaf's key path.
      strip_prefix: Leading names to drop (``"params"``, or ``"params.encoder"``).
      convert: Apply the documented conversions (module docs) for dtypes the format lacks.
      overwrite: Replace existing output files.
      compress: npz only: deflate the members (as ``np.savez_compressed``).
      progress: Called with (bytes written, total bytes).
      storage_options: For URLs, as for :func:`keepax.save` (``path``, and ``out`` for
        safetensors).

    Returns:
      What was written.

    Raises:
      UnsupportedLeafError: a leaf's dtype has no type in the format (without ``convert``).
      KeepaxError: two leaves get the same name, nothing is selected, or ``out`` exists.
    """
    if format not in FORMATS:
        raise KeepaxError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    ck = open_checkpoint(path, storage_options=storage_options)
    cast = None if dtype is None else _dtype(str(np.dtype(dtype).name) if not isinstance(
        dtype, str) else dtype)
    if cast is not None and not _is_float(cast):
        raise KeepaxError(f"dtype= casts floating-point leaves and must be a float type, got "
                          f"{cast}", path=ck.path)
    entries, skipped = _plan(ck.info, format, select, cast, convert, separator, strip_prefix)
    report = progress if progress is not None else (lambda done, total: None)
    if format == "safetensors":
        files = _export_safetensors(ck, out, entries, select, _common.parse_size(max_shard_size),
                                    overwrite, storage_options, report)
    elif format == "npz":
        target = _local(out, format)
        _check_new(target, overwrite)
        files = _write_npz(ck, target, entries, select, compress, report)
    else:
        target = _local(out, format)
        _check_new(target, overwrite)
        files = _write_hdf5(ck, target, entries, select, report)
    return ExportResult(
        format=format, files=tuple(files), names={e.path: e.name for e in entries},
        converted={e.path: e.conversion for e in entries if e.conversion},
        skipped=skipped, nbytes=sum(e.nbytes for e in entries),
    )


def _export_safetensors(ck: Any, out: str, entries: list[_Entry], select: Any, max_bytes: int,
                        overwrite: bool, storage_options: dict[str, Any] | None,
                        report: Any) -> list[str]:
    metadata = {"format": "flax", "keepax.source": ck.path,
                "keepax.metadata": json.dumps(ck.metadata, sort_keys=True)}
    converted = {e.name: e.conversion for e in entries if e.conversion}
    if converted:
        metadata["keepax.converted"] = json.dumps(converted, sort_keys=True)
    writer = _SafetensorsOut(out, entries, max_bytes, metadata, overwrite, storage_options)
    by_path = {e.path: e for e in entries}
    done, total = 0, sum(e.nbytes for e in entries)
    try:
        for leaf, value in ck.iter_leaves(select=select):
            entry = by_path.get(leaf.path)
            if entry is None:
                continue
            writer.write(entry, _value(entry, value))
            done += entry.nbytes
            report(done, total)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------------------------
# Command line.


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``keepax export PATH OUT --format ...``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="export to Hugging Face safetensors, NumPy .npz or HDF5",
        description="Export a checkpoint's arrays (streamed, one leaf at a time).")
    parser.add_argument("path", help="checkpoint directory or URL")
    parser.add_argument("out", help="output directory (safetensors) or file (npz, hdf5)")
    parser.add_argument("-f", "--format", choices=FORMATS, default="safetensors")
    parser.add_argument("--select", action="append", metavar="SUBTREE",
                        help="export only this subtree, e.g. params or params/encoder "
                             "(repeatable)")
    parser.add_argument("--dtype", help="cast floating-point leaves, e.g. bfloat16")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="most bytes per safetensors file (default 5GB)")
    parser.add_argument("--separator", default=".", help="joins key path names (default .)")
    parser.add_argument("--strip-prefix", help="leading names to drop, e.g. params")
    parser.add_argument("--convert", action="store_true",
                        help="convert dtypes the format lacks (int4->int8, complex->real pairs, "
                             "float8 variants->float32, PRNG keys->key data)")
    parser.add_argument("--compress", action="store_true", help="npz: deflate members")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output")
    _common.add_common(parser)
    parser.set_defaults(run=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Runs ``keepax export``; returns the exit status (0 done, 2 error)."""

    def body() -> int:
        with _common.Progress("export", quiet=args.quiet) as bar:
            result = export(
                args.path, args.out, args.format, select=args.select, dtype=args.dtype,
                max_shard_size=args.max_shard_size, separator=args.separator,
                strip_prefix=args.strip_prefix, convert=args.convert, overwrite=args.overwrite,
                compress=args.compress, progress=bar,
                storage_options=_common.storage_options(args),
            )
        if args.json:
            _common.print_json(result.to_json())
            return 0
        for leaf, why in result.skipped.items():
            print(f"skipped    {leaf}: {why}")
        for leaf, what in result.converted.items():
            print(f"converted  {leaf}: {what}")
        print(f"exported {len(result.names)} leaves ({_common.format_size(result.nbytes)}) to "
              f"{len(result.files)} file{'s' if len(result.files) != 1 else ''}: "
              f"{', '.join(result.files)}")
        return 0

    return _common.run_cli("export", body)
