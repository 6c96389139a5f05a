"""The S3 data plane of issue 15, against real servers (SeaweedFS and moto's standalone server):

- ``S3Backend.read_into``: ranged GETs read straight into the caller's buffer, ``part_size``
  pieces in parallel; what ``dist_ckpt.load`` uses for uncompressed tensors;
- clients built from boto3's configuration chain send UNSIGNED-PAYLOAD with a CRC32 of every
  body (no SHA-256 pass over the data) unless the user's profile asks for payload signing;
- one boto3 Session per process and AWS environment: a changed environment takes effect;
- faults mid-transfer through a real HTTP proxy (503 SlowDown, bodies cut off): the transfer
  completes within the retry budget, and beyond it fails naming the object, with nothing of a
  checkpoint visible.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import ClientError
from support.faulty_proxy import GET, UPLOAD_PART, FaultyProxy
from support.s3_fixtures import on_every_s3_implementation
from support.s3server import S3Server, make_s3_backend

import dist_ckpt
from dist_ckpt.errors import CheckpointNotFound, StorageError
from storage_backends import BackendError, ObjectNotFound, open_backend
from storage_backends.s3 import S3Backend
from storage_backends.s3_util import build_client, shared_session

MiB = 1024 * 1024
PART = 5 * MiB
SMALL_PARTS = dict(part_size=PART, multipart_threshold=PART, max_concurrency=4)

pytest_generate_tests = on_every_s3_implementation


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_server.endpoint_url) as p:
        yield p


def _state(mb: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    rows = mb * MiB // (4 * 4 * 1024)
    return {f"w{i}": torch.randn(rows, 1024, generator=g) for i in range(4)}


# -- read_into ------------------------------------------------------------------------------------


def test_read_into_whole_ranges_and_end(s3_server: S3Server, s3_uri: str) -> None:
    b = make_s3_backend(s3_server, s3_uri, **SMALL_PARTS)
    data = os.urandom(12 * MiB + 123)
    b.write_bytes("obj", data)
    out = bytearray(len(data))
    before = b.stats["get_object"]
    assert b.read_into("obj", 0, memoryview(out)) == len(data)
    assert out == data
    assert b.stats["get_object"] - before == 3  # three part-sized GETs, in parallel
    mid = bytearray(7 * MiB)
    assert b.read_into("obj", 4 * MiB + 5, memoryview(mid)) == len(mid)  # across piece boundaries
    assert mid == data[4 * MiB + 5 : 11 * MiB + 5]
    tail = bytearray(MiB)
    assert b.read_into("obj", len(data) - 100, memoryview(tail)) == 100  # short at the end
    assert tail[:100] == data[-100:] and not any(tail[100:])
    long_tail = bytearray(11 * MiB)  # several pieces, the last ones wholly past the end
    assert b.read_into("obj", 2 * MiB, memoryview(long_tail)) == len(data) - 2 * MiB
    assert long_tail[: len(data) - 2 * MiB] == data[2 * MiB :]
    assert b.read_into("obj", len(data) + 10, memoryview(bytearray(10))) == 0
    as_floats = torch.empty(MiB // 4)  # a tensor's memory, viewed as bytes
    assert b.read_into("obj", 0, memoryview(as_floats.numpy()).cast("B")) == MiB
    assert as_floats.numpy().tobytes() == data[:MiB]
    for length in (0, 1, 6 * MiB):
        with pytest.raises(ObjectNotFound) as info:
            b.read_into("nope", 0, memoryview(bytearray(length)))
        assert info.value.key == "nope"


def test_read_into_completes_through_503s_and_cut_off_bodies(
    s3_server: S3Server, s3_uri: str, proxy: FaultyProxy
) -> None:
    b = make_s3_backend(s3_server, s3_uri, endpoint_url=proxy.url, max_attempts=3, **SMALL_PARTS)
    data = os.urandom(11 * MiB)
    b.write_bytes("obj", data)
    proxy.add_fault("slowdown", 2, **GET)  # answered by boto3's retries
    proxy.add_fault("truncate", 2, **GET)  # headers and half the body, then a reset: fetched again
    out = bytearray(len(data))
    assert b.read_into("obj", 0, memoryview(out)) == len(data)
    assert out == data
    assert proxy.faults["slowdown"] == 2 and proxy.faults["truncate"] == 2


def test_read_into_beyond_the_retry_budget_names_the_object(
    s3_server: S3Server, s3_uri: str, proxy: FaultyProxy
) -> None:
    b = make_s3_backend(s3_server, s3_uri, endpoint_url=proxy.url, max_attempts=2, **SMALL_PARTS)
    b.write_bytes("step_1/shard", os.urandom(2 * MiB))
    proxy.add_fault("slowdown", 1000, **GET)
    with pytest.raises(BackendError) as info:
        b.read_into("step_1/shard", 0, memoryview(bytearray(2 * MiB)))
    assert info.value.code == "SlowDown" and "run/step_1/shard" in str(info.value)
    proxy.clear()
    proxy.add_fault("truncate", 2, **GET)  # as many as max_attempts: reported, not a short read
    with pytest.raises(BackendError, match="ResponseStreamingError|IncompleteRead") as cut:
        b.read_into("step_1/shard", 0, memoryview(bytearray(2 * MiB)))
    assert "run/step_1/shard" in str(cut.value)


# -- uploads ---------------------------------------------------------------------------------------


def _parts_on_server(server: S3Server, uri: str, key: str, upload_id: str) -> list[int]:
    full = uri[len("s3://") :].split("/", 1)[1] + "/" + key
    resp = server.client().list_parts(Bucket=_bucket(uri), Key=full, UploadId=upload_id)
    return sorted(p["PartNumber"] for p in resp.get("Parts", []))


@pytest.mark.parametrize("reserve", [0, 8])
def test_part_one_waits_for_commit_only_when_a_head_is_reserved(s3_server: S3Server, s3_uri: str, reserve: int) -> None:
    """Without a reserved head (uncompressed shards) part 1 is uploaded while writing, so the
    upload's tail after the last byte is one part; with one it waits for ``commit(head)``.
    What the server holds before commit is asked with ListParts."""
    b = make_s3_backend(s3_server, s3_uri, **SMALL_PARTS)
    data = os.urandom(3 * PART + 123)
    head = b"H" * reserve
    w = b.open_writer("obj", reserve_head=reserve)
    w.write(data)  # three full parts; the 123 (+ reserve) bytes left stay for commit
    expected_before = [1, 2, 3] if reserve == 0 else [2, 3]
    deadline = time.monotonic() + 60
    while w.parts_uploaded < len(expected_before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.upload_id is not None
    assert _parts_on_server(s3_server, s3_uri, "obj", w.upload_id) == expected_before
    assert w.commit(head) == len(data) + reserve
    assert w.parts_uploaded == 4 == b.stats["upload_part"]
    assert b.read("obj") == head + data


# -- the client boto3's configuration chain builds ------------------------------------------------


def _capture_upload_headers(client: Any) -> list[dict[str, str]]:
    seen: list[dict[str, str]] = []

    def before_send(request: Any, **_: Any) -> None:
        seen.append({k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()})

    client.meta.events.register("before-send.s3.UploadPart", before_send)
    client.meta.events.register("before-send.s3.PutObject", before_send)
    return seen


def test_payload_is_unsigned_but_checksummed_unless_the_profile_signs(
    s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(PART + 10)
    b = open_backend(s3_uri, **SMALL_PARTS)
    seen = _capture_upload_headers(b.client)
    b.write_bytes("obj", data)
    assert b.read("obj") == data
    assert len(seen) == 2  # two parts
    for headers in seen:
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-crc32" in headers  # the server checks the body against it

    config = tmp_path / "aws-config"
    config.write_text("[default]\ns3 =\n    payload_signing_enabled = true\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    signed = open_backend(s3_uri, **SMALL_PARTS)
    seen = _capture_upload_headers(signed.client)
    signed.write_bytes("small", b"abc")
    assert seen[0]["x-amz-content-sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert signed.read("small") == b"abc"


def test_a_body_that_does_not_match_its_checksum_is_refused(s3_env: S3Server, s3_uri: str) -> None:
    """What keeps an unsigned payload honest: the server checks the CRC32 the client sends.
    SeaweedFS (and AWS S3) refuse a mismatch; moto 5.2.5 does not check (nor does it check
    signatures), which this test records so that the README's server table stays true."""
    client = build_client()
    bucket = _bucket(s3_uri)
    if s3_env.name == "moto":
        client.put_object(Bucket=bucket, Key="run/bad", Body=b"payload", ChecksumCRC32="AAAAAA==")
        assert client.get_object(Bucket=bucket, Key="run/bad")["Body"].read() == b"payload"
        return
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="run/bad", Body=b"payload", ChecksumCRC32="AAAAAA==")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, info.value.response
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="run/bad")


def test_clients_share_a_session_per_environment(s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert shared_session()[0] is shared_session()[0]
    first = open_backend(s3_uri)
    first.write_bytes("x", b"1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    moved = open_backend(s3_uri)
    assert moved.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert moved.client is not first.client
    with pytest.raises(BackendError, match="127.0.0.1:9"):
        S3Backend.from_uri(s3_uri, max_attempts=1).read("x")
    monkeypatch.undo()


# -- dist_ckpt over the proxy, clients from the configuration chain -------------------------------


def test_save_and_load_complete_through_503s_mid_transfer(
    s3_env: S3Server, s3_uri: str, proxy: FaultyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    state = _state()
    uri = f"{s3_uri}/ckpt"
    proxy.add_fault("slowdown", 2, **UPLOAD_PART)
    dist_ckpt.save(state, uri, max_attempts=3, **SMALL_PARTS)
    assert proxy.faults["slowdown"] == 2
    proxy.add_fault("slowdown", 2, **GET)
    proxy.add_fault("truncate", 1, **GET)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dist_ckpt.load(target, uri, max_attempts=3, **SMALL_PARTS)
    assert all(torch.equal(target[k], state[k]) for k in state)
    assert proxy.faults["slowdown"] == 4 and proxy.faults["truncate"] == 1


def test_save_beyond_the_retry_budget_leaves_nothing_visible(
    s3_env: S3Server, s3_uri: str, proxy: FaultyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    uri = f"{s3_uri}/ckpt"
    proxy.add_fault("slowdown", 1000, **UPLOAD_PART)
    with pytest.raises(StorageError) as info:
        dist_ckpt.save(_state(), uri, max_attempts=2, **SMALL_PARTS)
    assert "SlowDown" in str(info.value) and _bucket(s3_uri) in str(info.value)
    client = s3_env.client()
    listed = client.list_objects_v2(Bucket=_bucket(s3_uri), Prefix="run/ckpt")
    assert [o["Key"] for o in listed.get("Contents", [])] == []
    assert (client.list_multipart_uploads(Bucket=_bucket(s3_uri)).get("Uploads") or []) == []
    with pytest.raises(CheckpointNotFound):
        dist_ckpt.load({k: torch.zeros_like(v) for k, v in _state().items()}, uri)


def test_a_child_forked_while_the_session_lock_is_held_builds_clients(s3_env: S3Server) -> None:
    """fork() while another thread builds a client (an async save, DataLoader workers starting):
    the child must not inherit the lock held forever, nor the parent's sessions."""
    from storage_backends import s3_util

    parent_session = shared_session()[0]
    with s3_util._SESSION_LOCK:  # what a parent thread inside build_client holds
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if it builds a working client of its own
            code = 1
            try:
                client = build_client(max_attempts=1)
                code = 0 if shared_session()[0] is not parent_session and client.list_buckets() is not None else 2
            finally:
                os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung building an S3 client (the session lock was inherited held)")
