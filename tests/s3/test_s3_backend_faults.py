"""S3Backend against real S3 servers (SeaweedFS and moto) through a real HTTP proxy that injects
503/500/connection resets (tests/support/faulty_proxy.py), and a client that loses answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from s3_backend_common import PART, MiB, bucket_name, open_uploads, proxied_backend
from support.faulty_proxy import COMPLETE_UPLOAD, GET, PUT_OBJECT, UPLOAD_PART, FaultyProxy
from support.s3_fixtures import on_every_s3_implementation
from support.s3server import S3Server

from storage_backends import (
    BackendError,
    ObjectExists,
)
from storage_backends.base import Versioned
from storage_backends.s3 import S3Backend

pytest_generate_tests = on_every_s3_implementation


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_server.endpoint_url) as p:
        yield p


# -- faults through a real HTTP proxy -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset"])
def test_transient_faults_are_retried(kind: str, s3_server: S3Server, s3_uri: str, proxy: FaultyProxy) -> None:
    b = proxied_backend(s3_server, s3_uri, proxy, max_attempts=3)
    data = os.urandom(12 * MiB)
    proxy.add_fault(kind, 2, **UPLOAD_PART)
    proxy.add_fault(kind, 1, **COMPLETE_UPLOAD)
    proxy.add_fault(kind, 1, **PUT_OBJECT)
    proxy.add_fault(kind, 1, **GET)
    w = b.open_writer("big", reserve_head=4)
    w.write(data)
    assert w.commit(b"HEAD") == len(data) + 4
    b.write_bytes("small", b"small")
    assert b.read("small") == b"small"
    assert b.read("big") == b"HEAD" + data
    assert proxy.faults[kind] == 5
    assert proxy.count(**UPLOAD_PART, faulted=False) == 3
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []


def test_failure_beyond_retry_budget_leaves_nothing(s3_server: S3Server, s3_uri: str, proxy: FaultyProxy) -> None:
    b = proxied_backend(s3_server, s3_uri, proxy, max_attempts=2)
    proxy.add_fault("slowdown", 1000, **UPLOAD_PART)
    w = b.open_writer("step_1/rank_0.bin", reserve_head=8)
    with pytest.raises(BackendError) as info:
        w.write(os.urandom(25 * MiB))
        w.commit(b"12345678")
    msg = str(info.value)
    assert info.value.code == "SlowDown"
    assert bucket_name(s3_uri) in msg and "run/step_1/rank_0.bin" in msg and "SlowDown" in msg
    assert not s3_server.client().list_objects_v2(Bucket=bucket_name(s3_uri)).get("Contents")
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []
    proxy.add_fault("internal", 1000, **PUT_OBJECT)
    with pytest.raises(BackendError, match="InternalError"):
        b.create_if_absent("step_1/COMMITTED", b"{}")
    assert not b.exists("step_1/COMMITTED")


def test_complete_failing_beyond_retries_aborts_upload(s3_server: S3Server, s3_uri: str, proxy: FaultyProxy) -> None:
    b = proxied_backend(s3_server, s3_uri, proxy, max_attempts=2)
    proxy.add_fault("internal", 2, **COMPLETE_UPLOAD)
    w = b.open_writer("obj")
    w.write(os.urandom(11 * MiB))
    with pytest.raises(BackendError, match="CompleteMultipartUpload") as info:
        w.commit()
    assert info.value.code == "InternalError"
    assert proxy.count(method="DELETE", query_has=("uploadId",)) == 1  # AbortMultipartUpload
    assert not b.exists("obj")
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []


def test_lost_answers_are_not_mistaken_for_conflicts(s3_server: S3Server, s3_uri: str, proxy: FaultyProxy) -> None:
    """The request went through but its answer was lost: boto3 retries, the retry meets our own
    write (412) — that is success, not a conflict."""
    b = proxied_backend(s3_server, s3_uri, proxy, max_attempts=3)
    proxy.add_fault("reset_after", 1, **PUT_OBJECT)
    b.create_if_absent("COMMITTED", b"done")
    v1 = b.compare_and_swap("manifest.json", b"m1", None)
    proxy.add_fault("reset_after", 1, **PUT_OBJECT)
    v2 = b.compare_and_swap("manifest.json", b"m2", v1)
    assert b.read_versioned("manifest.json") == Versioned(b"m2", v2)
    with pytest.raises(ObjectExists):
        b.create_if_absent("COMMITTED", b"other")
    proxy.add_fault("reset_after", 1, **COMPLETE_UPLOAD)
    data = os.urandom(11 * MiB)
    w = b.open_writer("obj")
    w.write(data)
    w.commit()
    assert b.read("obj") == data
    assert proxy.total_faults == 3


def test_get_body_cut_off_is_read_again(s3_server: S3Server, s3_uri: str, proxy: FaultyProxy) -> None:
    b = proxied_backend(s3_server, s3_uri, proxy, max_attempts=3)
    data = os.urandom(3 * MiB)
    b.write_bytes("x", data)
    proxy.add_fault("truncate", 2, **GET)
    out = bytearray(len(data))
    assert b.read_into("x", 0, memoryview(out)) == len(data) and out == data
    assert proxy.faults["truncate"] == 2
    proxy.add_fault("truncate", 2, **GET)
    assert b.read("x") == data
    assert proxy.faults["truncate"] == 4
    proxy.add_fault("truncate", 1, **GET)
    assert b.read_versioned("x").data == data  # type: ignore[union-attr]
    proxy.add_fault("truncate", 3, **GET)  # as many as max_attempts: reported
    with pytest.raises(BackendError, match="ResponseStreamingError|IncompleteRead") as info:
        b.read_versioned("x")
    assert "run/x" in str(info.value)


class _LosesCompleteAnswer:
    """A client whose CompleteMultipartUpload goes through but answers NoSuchUpload, as a
    store that is not idempotent would on boto3's retry after a lost answer."""

    def __init__(self, real: Any, really_complete: bool) -> None:
        self._real, self._really = real, really_complete

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        if self._really:
            self._real.complete_multipart_upload(**kwargs)
        raise ClientError(
            {"Error": {"Code": "NoSuchUpload", "Message": "gone"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
            "CompleteMultipartUpload",
        )


@pytest.mark.parametrize("really_complete", [True, False])
def test_complete_answered_no_such_upload(really_complete: bool, s3_server: S3Server, s3_uri: str) -> None:
    client = _LosesCompleteAnswer(s3_server.client(), really_complete)
    b = S3Backend.from_uri(s3_uri, client=client, part_size=PART, multipart_threshold=PART)
    data = os.urandom(11 * MiB)
    w = b.open_writer("obj")
    w.write(data)
    if really_complete:
        assert w.commit() == len(data)
        assert b.read("obj") == data
    else:
        with pytest.raises(BackendError, match="NoSuchUpload"):
            w.commit()
        assert not b.exists("obj")
    assert open_uploads(s3_server, bucket_name(s3_uri)) == []
