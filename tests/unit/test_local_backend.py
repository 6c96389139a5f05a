"""storage_backends.local.LocalBackend on a real directory: writing, reading, listing, deleting,
unsafe keys. Atomic operations, staging and uploads: test_local_backend_atomic.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage_backends import (
    Backend,
    BackendError,
    ObjectNotFound,
    ObjectWriter,
    UnsafeKey,
    open_backend,
)
from storage_backends.local import LocalBackend


@pytest.fixture
def be(tmp_path: Path) -> LocalBackend:
    return LocalBackend(str(tmp_path / "root"))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_satisfies_the_protocol_and_open_backend_picks_it(tmp_path):
    b = open_backend(str(tmp_path))
    assert isinstance(b, LocalBackend) and isinstance(b, Backend)
    assert b.uri == str(tmp_path)
    assert open_backend(f"file://{tmp_path}/x/").uri == str(tmp_path / "x")
    assert isinstance(b.open_writer("w"), ObjectWriter)


# --- writing ---------------------------------------------------------------------------------


def test_write_bytes_and_read(be):
    be.write_bytes("a/b/c.bin", b"hello world")
    assert Path(be.root, "a", "b", "c.bin").read_bytes() == b"hello world"
    assert be.read("a/b/c.bin") == b"hello world"
    assert be.size("a/b/c.bin") == 11
    assert be.exists("a/b/c.bin") and not be.exists("a/b/nope")
    be.write_bytes("a/b/c.bin", b"replaced")
    assert be.read("a/b/c.bin") == b"replaced"


def test_streaming_writer_is_invisible_until_commit(be):
    w = be.open_writer("step/shard")
    w.write(b"abc")
    w.write(memoryview(b"defg"))
    w.write(bytearray(b"h"))
    assert not be.exists("step/shard")
    assert be.list("step/") == []  # the temp file is not listed
    assert list(be.abandoned_uploads()) != []  # ...but is an unfinished upload
    assert w.commit() == 8
    assert be.read("step/shard") == b"abcdefgh"
    assert list(be.abandoned_uploads()) == []


def test_writer_accepts_non_byte_memoryviews(be):
    import array

    w = be.open_writer("ints")
    w.write(memoryview(array.array("i", [1, 2, 3])))
    assert w.commit() == 12
    assert be.read("ints") == array.array("i", [1, 2, 3]).tobytes()


def test_reserve_head_is_filled_at_commit(be):
    w = be.open_writer("f", reserve_head=8)
    w.write(b"payload")
    assert w.commit(b"HEADER!!") == 15
    assert be.read("f") == b"HEADER!!payload"


def test_reserve_head_size_mismatch_aborts(be, tmp_path):
    w = be.open_writer("f", reserve_head=8)
    w.write(b"payload")
    with pytest.raises(BackendError, match="8 were reserved"):
        w.commit(b"short")
    assert not be.exists("f")
    assert files_under(Path(be.root)) == []


def test_abort_leaves_nothing(be):
    w = be.open_writer("deep/dir/f", reserve_head=4)
    w.write(b"x" * 1000)
    w.abort()
    w.abort()  # twice is fine
    assert not be.exists("deep/dir/f")
    assert files_under(Path(be.root)) == []
    assert list(be.abandoned_uploads()) == []
    with pytest.raises(BackendError):
        w.write(b"more")
    with pytest.raises(BackendError):
        w.commit()


def test_commit_replaces_an_existing_object_atomically(be):
    be.write_bytes("f", b"old")
    w = be.open_writer("f")
    w.write(b"new content")
    assert be.read("f") == b"old"  # untouched until commit
    w.commit()
    assert be.read("f") == b"new content"


def test_large_streamed_write(be):
    chunk = os.urandom(1 << 20)
    w = be.open_writer("big")
    for _ in range(8):
        w.write(chunk)
    assert w.commit() == 8 << 20
    assert be.read("big", 3 << 20, 10) == chunk[:10]


# --- reading ---------------------------------------------------------------------------------


def test_ranged_reads_and_past_the_end(be):
    data = bytes(range(256))
    be.write_bytes("r", data)
    assert be.read("r", 10, 5) == data[10:15]
    assert be.read("r", 250) == data[250:]
    assert be.read("r", 250, 100) == data[250:]  # past the end: what exists
    assert be.read("r", 300, 10) == b""
    assert be.read("r", 0, 0) == b""


def test_read_into(be):
    data = os.urandom(5000)
    be.write_bytes("r", data)
    out = bytearray(1000)
    assert be.read_into("r", 123, memoryview(out)) == 1000
    assert bytes(out) == data[123:1123]
    tail = bytearray(100)
    assert be.read_into("r", 4950, memoryview(tail)) == 50  # short read at EOF reports the count
    assert bytes(tail[:50]) == data[4950:]


def test_missing_objects_raise_object_not_found(be):
    for call in (
        lambda: be.read("nope"),
        lambda: be.read("nope", 0, 10),
        lambda: be.read_into("nope", 0, memoryview(bytearray(1))),
        lambda: be.size("nope"),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert info.value.key == "nope"
        assert isinstance(info.value, FileNotFoundError)
    assert be.read_versioned("nope") is None


# --- listing and deleting --------------------------------------------------------------------


def test_list_with_prefix(be):
    for key in ["step_1/a", "step_1/b/c", "step_10/a", "step_2/a", "manifest.json", "step_1.tmp-x/a"]:
        be.write_bytes(key, key.encode())
    keys = lambda prefix="": [o.key for o in be.list(prefix)]  # noqa: E731
    assert keys() == sorted(["manifest.json", "step_1.tmp-x/a", "step_1/a", "step_1/b/c", "step_10/a", "step_2/a"])
    assert keys("step_1/") == ["step_1/a", "step_1/b/c"]
    assert keys("step_1") == ["step_1.tmp-x/a", "step_1/a", "step_1/b/c", "step_10/a"]
    assert keys("step_1/b/") == ["step_1/b/c"]
    assert keys("missing/") == []
    assert {o.key: o.size for o in be.list("step_2/")} == {"step_2/a": len(b"step_2/a")}
    assert LocalBackend(str(Path(be.root) / "does-not-exist")).list() == []


def test_list_refuses_unsafe_prefix(be):
    with pytest.raises(UnsafeKey):
        be.list("../")


def test_delete_and_delete_prefix(be):
    for key in ["s/a", "s/b/c", "s/b/d", "t/a", "s2/a"]:
        be.write_bytes(key, b"x")
    be.delete("t/a")
    be.delete("t/a")  # missing: not an error
    assert not be.exists("t/a")
    assert be.delete_prefix("s/") == 3
    assert not Path(be.root, "s").exists()  # the folder goes too
    assert [o.key for o in be.list()] == ["s2/a"]
    assert be.delete_prefix("nothing/") == 0


def test_delete_prefix_without_slash_deletes_matching_keys(be):
    for key in ["step_1/a", "step_10/a", "other/a"]:
        be.write_bytes(key, b"x")
    assert be.delete_prefix("step_1") == 2
    assert [o.key for o in be.list()] == ["other/a"]


# --- unsafe keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "/etc/passwd", "a/../../x", "a/./b", "a//b", "..", ".", "", "a\\b", "a\x00b"]
)
def test_unsafe_keys_are_refused_everywhere(be, tmp_path, key):
    (tmp_path / "x").write_bytes(b"outside")
    calls = [
        lambda: be.read(key),
        lambda: be.read_into(key, 0, memoryview(bytearray(1))),
        lambda: be.size(key),
        lambda: be.exists(key),
        lambda: be.write_bytes(key, b"evil"),
        lambda: be.open_writer(key),
        lambda: be.delete(key),
        lambda: be.delete_prefix(key),
        lambda: be.create_if_absent(key, b"evil"),
        lambda: be.read_versioned(key),
        lambda: be.compare_and_swap(key, b"evil", None),
        lambda: be.publish(key, "ok"),
        lambda: be.publish("ok", key),
    ]
    for call in calls:
        with pytest.raises(UnsafeKey):
            call()
    assert (tmp_path / "x").read_bytes() == b"outside"
    assert not Path("/abs").exists()
