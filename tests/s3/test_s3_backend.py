"""S3Backend against real S3 servers — every test that uses one runs on SeaweedFS and on moto's
standalone server (see tests/support/s3server.py): construction and every object operation.
Faults through a real HTTP proxy: test_s3_backend_faults.py."""

from __future__ import annotations

import os
import pickle
import random
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from s3_backend_common import PART, MiB, bucket_name, open_uploads
from support.s3_fixtures import on_every_s3_implementation
from support.s3server import S3Server, make_s3_backend

from storage_backends import (
    BackendError,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
    UnsafeKey,
    open_backend,
)
from storage_backends.base import Backend, ObjectWriter
from storage_backends.s3 import S3Backend
from storage_backends.s3_util import split_span

pytest_generate_tests = on_every_s3_implementation


@pytest.fixture
def backend(s3_server: S3Server, s3_uri: str) -> S3Backend:
    return make_s3_backend(s3_server, s3_uri, part_size=PART, multipart_threshold=PART, max_concurrency=4)


# -- pure helpers and construction ----------------------------------------------------------------


def test_split_span_cuts_into_part_sized_pieces() -> None:
    assert split_span(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_constructor_validates_and_normalises() -> None:
    client = object()
    b = S3Backend.from_uri("s3://bkt/runs/exp1/", client=client)
    assert (b.uri, b.bucket, b.prefix) == ("s3://bkt/runs/exp1", "bkt", "runs/exp1")
    assert S3Backend("bkt", client=client).uri == "s3://bkt"
    assert isinstance(b, Backend)
    with pytest.raises(ValueError, match="5 MiB"):
        S3Backend("bkt", client=client, part_size=4 * MiB)
    with pytest.raises(ValueError, match="no bucket"):
        S3Backend.from_uri("s3:///x", client=client)
    with pytest.raises(UnsafeKey):
        S3Backend.from_uri("s3://bkt/a/../b", client=client)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(b)


def test_open_backend_uses_standard_config_and_pickles(s3_uri: str) -> None:
    b = open_backend(s3_uri)  # endpoint and credentials from AWS_ENDPOINT_URL_S3 & co (s3_env)
    assert isinstance(b, S3Backend) and b.uri == s3_uri
    b.write_bytes("hello.txt", b"hi")
    clone = pickle.loads(pickle.dumps(b))
    assert clone.read("hello.txt") == b"hi"


# -- basic object operations ----------------------------------------------------------------------


def test_small_objects_read_size_exists(backend: S3Backend) -> None:
    backend.write_bytes("a/b.bin", bytes(range(256)))
    backend.write_bytes("empty", b"")
    assert backend.read("a/b.bin") == bytes(range(256))
    assert backend.read("a/b.bin", 10, 5) == bytes(range(10, 15))
    assert backend.read("a/b.bin", 250, 100) == bytes(range(250, 256))  # past the end: what exists
    assert backend.read("a/b.bin", 256) == b"" and backend.read("a/b.bin", 300, 4) == b""
    assert backend.read("a/b.bin", 3, 0) == b""
    assert backend.read("empty") == b"" and backend.size("empty") == 0
    assert backend.open_writer("empty2").commit() == 0 and backend.read("empty2") == b""
    assert backend.size("a/b.bin") == 256
    assert backend.exists("a/b.bin") and not backend.exists("a/nope")
    for call in (
        lambda: backend.read("nope"),
        lambda: backend.read("nope", 5, 5),
        lambda: backend.size("nope"),
        lambda: backend.read("nope", 0, 0),
        lambda: backend.read_into("nope", 0, memoryview(bytearray(1))),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert "nope" in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_key_validation_refuses_escaping_keys(backend: S3Backend) -> None:
    for bad in ("../x", "/abs", "a/../b", "", "a//b", "./a"):
        for call in (
            backend.read,
            backend.open_writer,
            backend.exists,
            backend.delete,
            backend.size,
            lambda k: backend.write_bytes(k, b"x"),
            lambda k: backend.create_if_absent(k, b"x"),
            lambda k: backend.read_into(k, 0, memoryview(bytearray(1))),
            lambda k: backend.compare_and_swap(k, b"", None),
        ):
            with pytest.raises(UnsafeKey):
                call(bad)
    with pytest.raises(UnsafeKey):
        backend.list("../")
    with pytest.raises(UnsafeKey):
        backend.delete_prefix("")
    assert backend.stats.snapshot() == {}  # refused before any request


def test_streaming_upload_bounded_memory_and_patched_head(backend: S3Backend, s3_uri: str, s3_server: S3Server) -> None:
    rng = random.Random(1)
    pieces = [rng.randbytes(MiB) for _ in range(8)]
    head = b"H" * 100
    tracemalloc.start()
    try:
        writer = backend.open_writer("step_1/rank_0.bin", reserve_head=len(head))
        assert isinstance(writer, ObjectWriter)
        for i in range(40):
            writer.write(memoryview(pieces[i % 8]))
        size = writer.commit(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = (backend.max_concurrency + 2) * PART
    assert size == 40 * MiB + 100
    assert writer.max_buffered_bytes <= bound, writer.max_buffered_bytes
    assert peak <= bound + 4 * MiB, f"peak traced memory {peak / MiB:.1f} MiB > {bound / MiB} MiB"
    assert writer.parts_uploaded == 9 == backend.stats["upload_part"]  # 8 full parts + the rest
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []
    assert backend.size("step_1/rank_0.bin") == size
    data = backend.read("step_1/rank_0.bin")
    assert data[:100] == head
    assert data[100:] == b"".join(pieces[i % 8] for i in range(40))
    assert backend.stats["get_object"] >= 9  # the big read went as parallel ranged GETs
    assert backend.read("step_1/rank_0.bin", 7 * MiB, 6 * MiB) == data[7 * MiB : 13 * MiB]
    # a commit that replaces an existing object
    with backend.open_writer("step_1/rank_0.bin", reserve_head=4) as w:
        w.write(b"tail")
        assert w.commit(b"head") == 8
    assert backend.read("step_1/rank_0.bin") == b"headtail"


def test_head_larger_than_a_part_and_wrong_head_length(backend: S3Backend, s3_uri: str, s3_server: S3Server) -> None:
    head = os.urandom(6 * MiB)
    body = os.urandom(7 * MiB)
    w = backend.open_writer("big_head", reserve_head=len(head))
    w.write(body)
    assert w.commit(head) == 13 * MiB
    assert backend.read("big_head") == head + body
    w = backend.open_writer("wrong_head", reserve_head=8)
    w.write(os.urandom(12 * MiB))
    with pytest.raises(ValueError, match="8"):
        w.commit(b"short")
    assert not backend.exists("wrong_head")
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []


def test_writer_abort_leaves_nothing(backend: S3Backend, s3_uri: str, s3_server: S3Server) -> None:
    w = backend.open_writer("step_2/x.bin", reserve_head=8)
    w.write(os.urandom(12 * MiB))  # a multipart upload is under way
    assert w.upload_id is not None and len(open_uploads(s3_server, bucket_name(s3_uri))) == 1
    w.abort()
    w.abort()
    with pytest.raises(ValueError):
        w.write(b"more")
    assert not backend.exists("step_2/x.bin")
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []
    with pytest.raises(RuntimeError), backend.open_writer("step_2/y.bin") as w2:
        w2.write(os.urandom(11 * MiB))
        raise RuntimeError("training crashed")
    assert backend.list() == [] and open_uploads(s3_server, bucket_name(s3_uri)) == []


def test_list_paginates_and_delete_prefix_batches(backend: S3Backend) -> None:
    keys = [f"step_1/f{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: backend.write_bytes(k, b"x"), keys))
    backend.write_bytes("step_10/keep", b"keep")
    backend.write_bytes("manifest.json", b"{}")
    backend.stats.reset()
    listed = backend.list("step_1/")
    assert [o.key for o in listed] == keys and all(o.size == 1 for o in listed)
    assert backend.stats["list_objects_v2"] >= 2  # more than one page
    assert [o.key for o in backend.list()][-2:] == ["step_1/f01099", "step_10/keep"]
    assert len(backend.list("step_")) == 1101
    assert backend.delete_prefix("step_1") == 1100  # a folder: step_10/ stays
    assert backend.stats["delete_objects"] == 2
    assert [o.key for o in backend.list()] == ["manifest.json", "step_10/keep"]
    backend.delete("manifest.json")
    backend.delete("manifest.json")  # missing: not an error
    assert [o.key for o in backend.list()] == ["step_10/keep"]


def test_create_if_absent(backend: S3Backend) -> None:
    backend.create_if_absent("step_1/COMMITTED", b'{"step": 1}')
    with pytest.raises(ObjectExists) as info:
        backend.create_if_absent("step_1/COMMITTED", b'{"step": 2}')
    assert info.value.code in ("PreconditionFailed", "ConditionalRequestConflict")
    assert "step_1/COMMITTED" in str(info.value)
    assert backend.read("step_1/COMMITTED") == b'{"step": 1}'


def test_concurrent_create_if_absent_exactly_one_wins(backend: S3Backend) -> None:
    # SeaweedFS serialises conditional writes of one key with a lock it polls every second, so
    # losers may take a few seconds to hear 412; two rounds of six writers keep this short.
    for trial in range(2):
        barrier = threading.Barrier(6)

        def attempt(i: int, key: str = f"race{trial}", barrier: threading.Barrier = barrier) -> int | None:
            barrier.wait()
            try:
                backend.create_if_absent(key, f"writer {i}".encode())
                return i
            except ObjectExists:
                return None

        with ThreadPoolExecutor(6) as pool:
            winners = [w for w in pool.map(attempt, range(6)) if w is not None]
        assert len(winners) == 1, winners
        assert backend.read(f"race{trial}") == f"writer {winners[0]}".encode()


def test_compare_and_swap(backend: S3Backend) -> None:
    assert backend.read_versioned("manifest.json") is None
    v1 = backend.compare_and_swap("manifest.json", b"v1", None)
    with pytest.raises(PreconditionFailed):
        backend.compare_and_swap("manifest.json", b"again", None)
    cur = backend.read_versioned("manifest.json")
    assert cur is not None and (cur.data, cur.version) == (b"v1", v1)
    v2 = backend.compare_and_swap("manifest.json", b"v2", v1)
    assert v2 != v1
    with pytest.raises(PreconditionFailed) as info:
        backend.compare_and_swap("manifest.json", b"stale", v1)
    assert "manifest.json" in str(info.value)
    barrier = threading.Barrier(6)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            backend.compare_and_swap("manifest.json", f"w{i}".encode(), v2)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(attempt, range(6))) == 1
    # If-Match on an object deleted meanwhile: AWS and moto answer 404, SeaweedFS 412 — both lose
    current = backend.read_versioned("manifest.json")
    assert current is not None
    backend.delete("manifest.json")
    with pytest.raises(PreconditionFailed, match="manifest.json"):
        backend.compare_and_swap("manifest.json", b"late", current.version)
    assert not backend.exists("manifest.json")


def test_staging_and_publish(backend: S3Backend) -> None:
    assert backend.staging_prefix("step_000000005", "abc") == "step_000000005"
    backend.write_bytes("step_000000005/a", b"a")
    backend.publish("step_000000005", "step_000000005")
    assert backend.read("step_000000005/a") == b"a"
    backend.write_bytes("elsewhere/b", b"b")
    backend.publish("elsewhere", "step_000000006")
    assert [o.key for o in backend.list()] == ["step_000000005/a", "step_000000006/b"]
    with pytest.raises(ObjectExists):
        backend.write_bytes("other/c", b"c")
        backend.publish("other", "step_000000006")


def test_abandoned_uploads_are_listed_and_aborted(backend: S3Backend, s3_uri: str, s3_server: S3Server) -> None:
    raw = s3_server.client()
    bucket = bucket_name(s3_uri)
    up = raw.create_multipart_upload(Bucket=bucket, Key="run/step_3/rank_0.bin")
    raw.upload_part(Bucket=bucket, Key="run/step_3/rank_0.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
    raw.create_multipart_upload(Bucket=bucket, Key="other-run/step_3/rank_0.bin")  # outside our root
    assert list(backend.abandoned_uploads()) == ["step_3/rank_0.bin"]
    assert list(backend.abandoned_uploads("step_4/")) == []
    # Ages come from the server's Initiated time (moto 5.2.5 reports 2010-11-10 for every upload)
    initiated = min(u["Initiated"] for u in open_uploads(s3_server, bucket))
    age = (datetime.now(timezone.utc) - initiated).total_seconds()
    assert backend.abort_uploads(older_than=age + 3600) == 0  # too young to be abandoned
    assert backend.abort_uploads("step_3/") == 1
    assert list(backend.abandoned_uploads()) == []
    assert [u["Key"] for u in open_uploads(s3_server, bucket)] == ["other-run/step_3/rank_0.bin"]


def test_errors_name_bucket_key_and_code(s3_env: S3Server) -> None:
    s3_server = s3_env
    b = make_s3_backend(s3_server, "s3://no-such-bucket-here/run")
    with pytest.raises(BackendError) as info:
        b.write_bytes("k", b"x")
    msg = str(info.value)
    assert "no-such-bucket-here" in msg and "run/k" in msg and "NoSuchBucket" in msg
    assert info.value.code == "NoSuchBucket" and info.value.key == "k"
    assert info.value.__cause__ is not None
    dead = S3Backend("bkt", "run", endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(BackendError) as info:
        dead.read("x")
    assert "s3://bkt/run/x" in str(info.value) and "127.0.0.1:9" in str(info.value)
