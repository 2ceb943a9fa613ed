"""One conformance suite that every storage backend must pass."""

from __future__ import annotations

import os

import pytest

from keepax._src.commit import protocol
from keepax._src.io import (
    FsspecStorage,
    LocalStorage,
    MemoryStorage,
    Storage,
    is_hidden_name,
    memory,
    open_root,
    split_checkpoint_path,
)
from keepax.errors import InvalidPathError


@pytest.fixture(params=["local", "memory", "s3", "s3rver", "fsspec-memory"])
def storage(request: pytest.FixtureRequest, tmp_path) -> Storage:  # noqa: ANN001
    if request.param == "local":
        yield LocalStorage(tmp_path / "root")
    elif request.param == "memory":
        yield MemoryStorage(f"memory://conformance-{id(request)}/root")
        memory.clear(f"conformance-{id(request)}")
    elif request.param in ("s3", "s3rver"):
        s3 = request.getfixturevalue(request.param)
        # Small parts, so that multipart uploads and split reads are exercised too.
        options = {**s3.options, "keepax_part_size": 5 << 20}
        yield FsspecStorage(f"{s3.url}/root", options)
    else:
        # Any other fsspec file system goes through the generic path.
        fsspec = pytest.importorskip("fsspec")
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        fs.store.clear()
        fs.pseudo_dirs[:] = [""]
        yield FsspecStorage(f"memory://conformance-{id(request)}/root", filesystem=fs)
        fs.store.clear()


def read_all(storage: Storage, path: str) -> bytes:
    return storage.read_bytes(path)


def test_write_read_and_ranged_reads(storage: Storage) -> None:
    writer = storage.create("a/b/file.bin")
    writer.write(memoryview(b"hello "))
    writer.writev([memoryview(b"big "), memoryview(b""), memoryview(b"world")])
    writer.close()
    assert read_all(storage, "a/b/file.bin") == b"hello big world"
    reader = storage.open("a/b/file.bin")
    assert reader.size() == 15
    out = bytearray(5)
    assert reader.read_into(6, memoryview(out)) == 5 and out == b"big w"
    tail = bytearray(10)
    assert reader.read_into(10, memoryview(tail)) == 5  # short read only at the end
    reader.close()


def test_vectored_reads_fill_buffers_in_order(storage: Storage) -> None:
    data = bytes(range(256)) * 40
    storage.write_bytes("v", data)
    reader = storage.open("v")
    outs = [bytearray(n) for n in (0, 7, 1000, 3000, 5)]
    assert reader.readv_into(3, [memoryview(o) for o in outs]) == 4012
    assert b"".join(outs) == data[3:4015]
    tail = [bytearray(10), bytearray(10)]
    assert reader.readv_into(len(data) - 15, [memoryview(t) for t in tail]) == 15
    reader.close()


def test_writev_many_buffers(storage: Storage) -> None:
    parts = [bytes([i % 256]) * (i % 7) for i in range(3000)]  # > IOV_MAX buffers
    writer = storage.create("many")
    writer.writev([memoryview(p) for p in parts])
    writer.close()
    assert read_all(storage, "many") == b"".join(parts)


def test_missing_files(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.open("nope")
    assert not storage.exists("nope") and not storage.is_dir("nope")
    assert storage.list("nope") == []
    storage.delete("nope")  # ignored


def test_list_exists_delete(storage: Storage) -> None:
    storage.write_bytes("d/x", b"1")
    storage.write_bytes("d/sub/y", b"2")
    storage.write_bytes("e", b"3")
    assert storage.list("") == ["d", "e"]
    assert storage.list("d") == ["sub", "x"]
    assert storage.is_dir("d") and not storage.is_dir("e") and storage.exists("e")
    storage.delete("d")
    assert not storage.exists("d") and storage.exists("e")
    storage.delete("e")
    assert storage.list("") == []


def test_rename_never_replaces_and_exchange_swaps(storage: Storage) -> None:
    if not storage.atomic_rename:
        with pytest.raises(NotImplementedError):
            storage.rename_dir("one", "two")
        return
    storage.write_bytes("one/f", b"1")
    storage.write_bytes("two/f", b"2")
    with pytest.raises(FileExistsError):
        storage.rename_dir("one", "two")
    assert read_all(storage, "two/f") == b"2"
    storage.rename_dir("one", "three")
    assert not storage.exists("one") and read_all(storage, "three/f") == b"1"
    storage.rename_dir("three", "two", exchange=True)
    assert read_all(storage, "two/f") == b"1" and read_all(storage, "three/f") == b"2"


def test_commit_protocol(storage: Storage) -> None:
    if not storage.atomic_rename:
        pytest.skip("marker backends: see test_marker_commit_protocol")
    staging = storage.staging_name("ckpt")
    assert is_hidden_name(staging) and staging != "ckpt"
    storage.write_bytes(f"{staging}/f", b"new")
    assert not storage.exists("ckpt")
    storage.commit(staging, "ckpt", replace=False)
    assert read_all(storage, "ckpt/f") == b"new" and not storage.exists(staging)

    again = storage.staging_name("ckpt")
    storage.write_bytes(f"{again}/f", b"other")
    with pytest.raises(FileExistsError):
        storage.commit(again, "ckpt", replace=False)
    assert read_all(storage, "ckpt/f") == b"new"
    storage.commit(again, "ckpt", replace=True)
    assert read_all(storage, "ckpt/f") == b"other"
    assert [n for n in storage.list("") if is_hidden_name(n)] == [], storage.list("")


def test_marker_commit_protocol(storage: Storage) -> None:
    """The commit layer's marker steps over each backend: rename backends stage elsewhere;
    marker backends write in place, the marker first gone."""
    assert storage.modified("nothing") is None
    protocol.begin_write(storage, "new", replace=False)  # nothing there: nothing to do
    if storage.atomic_rename:
        storage.write_bytes("old/keepax.commit", b"m")
        protocol.begin_write(storage, "old", replace=False)  # staged elsewhere: the old one stays
        assert storage.exists("old/keepax.commit") and not protocol.is_unfinished(storage, "old")
        return
    assert storage.staging_name("ckpt") == "ckpt"
    storage.write_bytes("ckpt/data/p0.safetensors", b"data")
    storage.write_bytes("ckpt/manifest.json", b"{}")
    assert protocol.is_unfinished(storage, "ckpt")  # no marker yet
    storage.write_bytes("ckpt/keepax.commit", b"m")
    storage.commit("ckpt", "ckpt", replace=False)  # nothing to do
    assert not protocol.is_unfinished(storage, "ckpt")
    with pytest.raises(FileExistsError):
        protocol.begin_write(storage, "ckpt", replace=False)
    assert storage.exists("ckpt/keepax.commit")
    protocol.begin_write(storage, "ckpt", replace=True)  # the old checkpoint goes, marker first
    assert not storage.exists("ckpt")
    # Leftovers of an interrupted save are cleared; foreign files are refused.
    storage.write_bytes("left/manifest.json", b"{}")
    protocol.begin_write(storage, "left", replace=False)
    assert not storage.exists("left")
    storage.write_bytes("foreign/notes.txt", b"mine")
    assert not protocol.is_unfinished(storage, "foreign")
    with pytest.raises(FileExistsError):
        protocol.begin_write(storage, "foreign", replace=False)
    assert storage.exists("foreign/notes.txt")


def test_modified_times(storage: Storage) -> None:
    import time

    before = time.time()
    storage.write_bytes("d/sub/f", b"x")
    modified = storage.modified("d")
    if modified is not None:  # backends without times answer None
        assert before - 5 <= modified <= time.time() + 5
        assert storage.modified("d/sub/f") == modified


def test_big_file_in_parts(storage: Storage) -> None:
    """Several upload parts and split ranged reads (5 MiB parts on S3)."""
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    writer = storage.create("big/file")
    view = memoryview(data)
    for start in range(0, len(data), 3 << 20):
        mib = 1 << 20
        writer.writev([view[start : start + mib], view[start + mib : start + 3 * mib]])
    writer.close()
    reader = storage.open("big/file")
    assert reader.size() == len(data)
    outs = [bytearray(1 << 20), bytearray(9 << 20), bytearray(3 << 20)]
    assert reader.readv_into(100, [memoryview(o) for o in outs]) == len(data) - 100
    assert b"".join(outs)[: len(data) - 100] == data[100:]
    reader.close()


def test_aborted_big_file_is_not_visible(storage: Storage) -> None:
    writer = storage.create("gone/file")
    writer.write(memoryview(bytes(11 << 20)))
    writer.abort()
    if not storage.atomic_rename:
        assert not storage.exists("gone/file")


def test_abort_leaves_nothing_committed(storage: Storage) -> None:
    writer = storage.create("x")
    writer.write(memoryview(b"partial"))
    writer.abort()
    assert not storage.exists("x") or read_all(storage, "x") in (b"", b"partial")


def test_path_resolution(tmp_path) -> None:
    storage, name = split_checkpoint_path(str(tmp_path / "ckpt"))
    assert isinstance(storage, LocalStorage) and name == "ckpt"
    assert storage.display(name).endswith("ckpt")
    storage, name = split_checkpoint_path("memory://store/dir/ckpt")
    assert isinstance(storage, MemoryStorage) and name == "ckpt"
    assert storage.display(name) == "memory://store/dir/ckpt"
    assert isinstance(open_root(f"file://{tmp_path}"), LocalStorage)
    with pytest.raises(ValueError, match="memory://store/name"):
        split_checkpoint_path("memory://store")
    with pytest.raises(InvalidPathError, match="not supported"):
        open_root("nosuchscheme://host/x")
    with pytest.raises(InvalidPathError, match="bucket and a name"):
        split_checkpoint_path("s3://bucket")
    with pytest.raises(InvalidPathError, match="empty"):
        split_checkpoint_path("")
    with pytest.raises(ValueError, match="keepax_part_size"):
        open_root("s3://bucket/x", {"keepax_part_size": 1})
    with pytest.raises(ValueError, match="unknown storage option"):
        open_root("s3://bucket/x", {"keepax_parts": 1})


def test_unknown_url_schemes_are_invalid_paths() -> None:
    import numpy as np

    import keepax

    for call in (lambda: keepax.save("foo://b/x", {"w": np.ones(2)}),
                 lambda: keepax.restore("foo://b/x"), lambda: keepax.inspect("foo://b/x")):
        with pytest.raises(InvalidPathError, match="'foo' is not supported") as info:
            call()
        assert isinstance(info.value, ValueError) and info.value.path == "foo://b/x"


def test_abort_uploads_leaves_files_alone(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    """S3 (moto) has multipart uploads to abort; s3rver cannot list them (nothing aborted);
    elsewhere there are none. A file whose upload was not aborted is finished as usual."""
    storage.write_bytes("d/f", b"kept")
    writer = storage.create("d/big")
    writer.write(memoryview(bytes(6 << 20)))  # > one 5 MiB part on S3: an upload in flight
    s3 = request.node.callspec.params["storage"] == "s3"
    assert storage.abort_uploads("d", older_than=0) == (1 if s3 else 0)
    if s3:
        with pytest.raises(OSError):  # its upload is gone
            writer.close()
        assert not storage.exists("d/big")
    else:
        writer.close()
        assert len(read_all(storage, "d/big")) == 6 << 20
    assert read_all(storage, "d/f") == b"kept"
    assert storage.abort_uploads("", older_than=0) == 0


def test_local_files_are_synced_and_visible_to_the_os(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("f", b"abc")
    with open(os.path.join(tmp_path, "f"), "rb") as f:
        assert f.read() == b"abc"
    storage.sync_dir("")
