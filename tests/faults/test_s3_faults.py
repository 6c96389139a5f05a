"""S3 faults at the manager level, against a real S3 server (SeaweedFS) behind an HTTP proxy
that answers 503 SlowDown, 500 InternalError or resets the connection
(tests/support/faulty_proxy.py). Shards are multipart uploads (5 MiB parts).

- within boto3's retry budget (``max_attempts=3``): the save succeeds;
- beyond it: StorageError naming the object, no COMMITTED, the previous checkpoint still
  last, the failed multipart upload aborted;
- CompleteMultipartUpload failing: the same;
- a process SIGKILLed between UploadPart and CompleteMultipartUpload leaves an orphaned
  upload that ``RunStore.collect_garbage`` (``dist-ckpt gc``) and a manager start remove."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_named_error, check_run, committed_steps, wait_for
from support.faulty_proxy import COMPLETE_UPLOAD, PUT_OBJECT, UPLOAD_PART, FaultyProxy
from support.s3server import S3Server, make_s3_backend

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import StorageError
from dist_ckpt.run_store import RunStore

pytestmark = QUIET
MiB = 1024 * 1024
WIDTH = 1000  # ~12 MB of parameters + AdamW state: a 3-part multipart upload per shard
S3_OPTS = dict(part_size=5 * MiB, multipart_threshold=5 * MiB, max_concurrency=2)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_server.endpoint_url) as p:
        yield p


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def _uploads(server: S3Server, uri: str) -> list[dict]:
    return server.client().list_multipart_uploads(Bucket=_bucket(uri)).get("Uploads", []) or []


def _job(server: S3Server, uri: str, proxy: FaultyProxy, tmp_path: Path) -> LocalJob:
    backend = make_s3_backend(server, uri, endpoint_url=proxy.url, max_attempts=3, **S3_OPTS)
    return LocalJob(uri, tmp_path / "refs", backend=backend, width=WIDTH)


def _clean(server: S3Server, uri: str):
    return make_s3_backend(server, uri, **S3_OPTS)


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset"])
def test_s3_errors_within_the_retry_budget(s3_server, s3_uri, proxy, tmp_path: Path, kind: str) -> None:
    job = _job(s3_server, s3_uri, proxy, tmp_path)
    assert job.save(1)
    proxy.add_fault(kind, 2, **UPLOAD_PART)
    proxy.add_fault(kind, 2, **PUT_OBJECT)  # metadata.json, COMMITTED (If-None-Match), manifest (If-Match)
    proxy.add_fault(kind, 1, **COMPLETE_UPLOAD)
    assert job.save(2)
    job.close()
    assert proxy.total_faults == 5, proxy.faults
    assert _uploads(s3_server, s3_uri) == []
    check_run(s3_uri, tmp_path / "refs", expect_last=2, backend=_clean(s3_server, s3_uri), width=WIDTH)


@pytest.mark.parametrize(
    "kind,matcher",
    [("slowdown", UPLOAD_PART), ("internal", UPLOAD_PART), ("reset", UPLOAD_PART), ("internal", COMPLETE_UPLOAD)],
    ids=["slowdown-upload-part", "internal-upload-part", "reset-upload-part", "complete-multipart-upload-fails"],
)
def test_s3_errors_beyond_the_retry_budget(s3_server, s3_uri, proxy, tmp_path: Path, kind: str, matcher: dict) -> None:
    job = _job(s3_server, s3_uri, proxy, tmp_path)
    assert job.save(1)
    proxy.add_fault(kind, 10_000, **matcher)
    with pytest.raises(StorageError) as err:
        job.save(2)
    assert_named_error(err.value, "step_000000002/rank_00000", _bucket(s3_uri))
    if matcher is COMPLETE_UPLOAD:
        assert "CompleteMultipartUpload" in str(err.value)
    job.close()
    proxy.clear()
    clean = _clean(s3_server, s3_uri)
    assert committed_steps(clean) == [1]
    assert not clean.list("step_000000002/"), "no object of the failed step may be visible"
    assert _uploads(s3_server, s3_uri) == [], "the failed multipart upload must be aborted"
    check_run(s3_uri, tmp_path / "refs", expect_last=1, backend=clean, width=WIDTH)


_ORPHAN = textwrap.dedent(
    """
    import sys, time
    from storage_backends import open_backend
    b = open_backend(sys.argv[1], part_size=5 << 20, multipart_threshold=5 << 20, max_concurrency=2)
    w = b.open_writer("step_000000002/rank_00000.safetensors")
    w.write(b"x" * (16 << 20))            # parts 1..3 upload while writing (no reserved head)
    while w.parts_uploaded < 2:
        time.sleep(0.05)
    print("UPLOADING", w.upload_id, flush=True)
    time.sleep(600)                       # SIGKILLed here: never completed, never aborted
    """
)


def test_orphaned_multipart_upload_is_collected(s3_server, s3_uri, s3_env, tmp_path: Path) -> None:
    clean = _clean(s3_server, s3_uri)
    job = LocalJob(s3_uri, tmp_path / "refs", backend=clean, width=64)
    job.save(1)
    job.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, s3_uri],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("UPLOADING"), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: _uploads(s3_server, s3_uri), 10, "the orphaned upload to be listed")
    assert not clean.list("step_000000002/")  # invisible: nothing completed
    store = RunStore(clean)
    assert store.leftovers().unfinished_uploads == ("step_000000002/rank_00000.safetensors",)
    found = store.collect_garbage()  # what `dist-ckpt gc` runs
    assert found.unfinished_uploads and _uploads(s3_server, s3_uri) == []
    check_run(s3_uri, tmp_path / "refs", expect_last=1, backend=clean)


def test_orphaned_multipart_upload_is_removed_at_manager_start(s3_server, s3_uri, tmp_path: Path) -> None:
    """The same leftover, found by the next job's manager start instead of `gc`."""
    clean = _clean(s3_server, s3_uri)
    job = LocalJob(s3_uri, tmp_path / "refs", backend=clean, width=64)
    job.save(1)
    job.close()
    upload = s3_server.client().create_multipart_upload(
        Bucket=_bucket(s3_uri), Key="run/step_000000002/rank_00000.safetensors"
    )
    s3_server.client().upload_part(
        Bucket=_bucket(s3_uri),
        Key="run/step_000000002/rank_00000.safetensors",
        UploadId=upload["UploadId"],
        PartNumber=2,
        Body=b"y" * (5 * MiB),
    )
    assert len(_uploads(s3_server, s3_uri)) == 1
    CheckpointManager(s3_uri, backend=clean).close()
    assert _uploads(s3_server, s3_uri) == []
    check_run(s3_uri, tmp_path / "refs", expect_last=1, backend=clean)
