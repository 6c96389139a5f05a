"""Tiered checkpoints against the real SeaweedFS server: real trainer processes SIGKILLed,
the detached uploader SIGKILLed, the server stopped and restarted, a local shard damaged."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tier_support import assert_same_tensors, reap_uploaders, run_job, start_job, uploader_pid, wait_for

from dist_ckpt.format import metadata_json
from dist_ckpt.run_store import RunStore
from dist_ckpt.verify import verify_checkpoint
from storage_backends import open_backend


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    reap_uploaders(tmp_path)


def _committed_at(uri: str) -> list[int]:
    return [e.step for e in RunStore(open_backend(uri)).committed_entries()]


def test_trainer_killed_after_wait_step_reaches_s3_and_a_new_node_resumes(s3_uri: str, work: Path) -> None:
    local, dump = work / "node_a", work / "a"
    proc = run_job(
        "--root",
        s3_uri,
        "--local-root",
        str(local),
        "--steps",
        "0,1,2",
        "--mb",
        "4",
        "--kill-after-wait",
        "2",
        "--dump",
        str(dump),
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert (dump / "waited").read_text() == "2"
    # no restart of anything: the detached uploader outlives the trainer and commits step 2
    wait_for(lambda: 2 in _committed_at(s3_uri), 60, "step 2 committed at the S3 root")
    assert verify_checkpoint(open_backend(s3_uri), "step_000000002").ok
    # a new node: an empty local tier; it resumes from S3, bit for bit
    fresh, dump_b = work / "node_b", work / "b"
    run_job("--root", s3_uri, "--local-root", str(fresh), "--restore", "--mb", "4", "--dump", str(dump_b))
    resumed = json.loads((dump_b / "resume.json").read_text())
    assert resumed["step"] == 2 and resumed["uri"].startswith(s3_uri), resumed
    assert_same_tensors(dump / "saved_2.safetensors", dump_b / "restored.safetensors")


@pytest.mark.slow  # 24 MiB single-stepped through SIGSTOP/SIGCONT, then three jobs
def test_uploader_killed_mid_promotion_is_finished_by_the_next_start(s3_uri: str, s3_server, work: Path) -> None:  # noqa: ANN001
    local, dump = work / "node", work / "a"
    options = json.dumps({"part_size": 5 << 20, "max_concurrency": 1})
    bucket, prefix = s3_uri[5:].split("/", 1)
    client = s3_server.client()
    # close(wait_for_upload=False): the job ends; its uploader sends 24 MiB in 5 MiB parts
    job = start_job(
        "--root",
        s3_uri,
        "--local-root",
        str(local),
        "--steps",
        "0",
        "--mb",
        "24",
        "--no-wait-upload",
        "--backend-options",
        options,
        "--dump",
        str(dump),
    )

    def uploading() -> bool:
        found = client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/step_000000000/").get("Uploads")
        return bool(found)

    # Single-step the uploader (SIGSTOP/SIGCONT) until a multipart upload of step 0 is open, then kill it.
    pid = wait_for(lambda: uploader_pid(local), 60, "the uploader started", poll=0.002)
    os.kill(pid, signal.SIGSTOP)
    while not uploading():
        assert _committed_at(s3_uri) == [], "the promotion finished before it could be interrupted"
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) == 0, job.stderr.read()[-4000:] if job.stderr else ""
    wait_for(lambda: uploader_pid(local) is None, 10, "the killed uploader gone")
    # nothing partial is visible: no COMMITTED, and every object there is complete
    assert _committed_at(s3_uri) == []
    meta = metadata_json.loads((local / "step_000000000" / "metadata.json").read_bytes(), "metadata.json")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/step_000000000/").get("Contents", [])
    for obj in listed:
        name = obj["Key"].rsplit("/", 1)[-1]
        assert name in meta.files and obj["Size"] == meta.files[name].size, obj
    # the next manager start on this node adopts the queue and finishes the promotion
    # (its close() waits for its own saves only: the adopted step is the detached uploader's to finish)
    run_job(
        "--root",
        s3_uri,
        "--local-root",
        str(local),
        "--mb",
        "24",
        "--backend-options",
        options,
        "--dump",
        str(work / "b"),
    )
    wait_for(lambda: _committed_at(s3_uri) == [0], 120, "the adopted promotion of step 0 committed")
    assert verify_checkpoint(open_backend(s3_uri), "step_000000000").ok
    assert not list(open_backend(s3_uri).abandoned_uploads("step_")), "the killed upload was not aborted"
    run_job("--root", s3_uri, "--local-root", str(work / "fresh"), "--restore", "--mb", "24", "--dump", str(work / "c"))
    assert_same_tensors(dump / "saved_0.safetensors", work / "c" / "restored.safetensors")


@pytest.mark.slow  # three trainer processes
def test_flipped_byte_in_a_local_shard_falls_back_to_s3_naming_the_file(s3_uri: str, work: Path) -> None:
    local, dump = work / "node", work / "a"
    run_job("--root", s3_uri, "--local-root", str(local), "--steps", "0,1", "--persisted", "--dump", str(dump))
    shard = local / "step_000000001" / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # in the data region
    shard.write_bytes(bytes(data))
    proc = run_job("--root", s3_uri, "--local-root", str(local), "--restore", "--dump", str(work / "b"))
    resumed = json.loads((work / "b" / "resume.json").read_text())
    assert resumed["step"] == 1 and resumed["uri"].startswith(s3_uri), resumed
    assert str(shard) in proc.stderr and "damaged" in proc.stderr, proc.stderr[-3000:]
    assert_same_tensors(dump / "saved_1.safetensors", work / "b" / "restored.safetensors")


def _restart_same_ports(server) -> None:  # noqa: ANN001
    """Start the stopped SeaweedFS again on its ports, over its data (the endpoint stays valid)."""
    from support.s3server import _launch, _wait_ready, find_weed

    server.process = _launch(
        find_weed(), server.workdir, server.ports, server.workdir / "s3-identities.json", server.log_path
    )
    _wait_ready(server, 60)


@pytest.mark.slow
def test_s3_down_restore_takes_the_newer_local_step_and_promotion_catches_up(work: Path, monkeypatch) -> None:  # noqa: ANN001
    from support.s3server import start_seaweedfs

    server = start_seaweedfs(work / "weed")
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)  # the jobs and their uploaders use this server
        uri = f"s3://{server.create_bucket()}/run"
        local, dump, go = work / "node", work / "a", work / "go"
        job = start_job(
            "--root",
            uri,
            "--local-root",
            str(local),
            "--steps",
            "0,1,2,3",
            "--persisted",
            "--pause-after",
            "1",
            "--go",
            str(go),
            "--no-wait-upload",
            "--dump",
            str(dump),
        )
        wait_for(lambda: (dump / "paused_1").exists() or job.poll() is not None, 120, "steps 0, 1 persisted")
        assert _committed_at(uri) == [0, 1]
        server.stop()  # S3 unreachable: steps 2 and 3 commit locally, their promotion retries
        go.write_text("")
        assert job.wait(timeout=180) == 0, job.stderr.read()[-4000:] if job.stderr else ""
        uploader = uploader_pid(local)
        assert uploader is not None, "the uploader gave up while promotions were queued"
        os.kill(uploader, signal.SIGSTOP)  # holds the promotion back until the restore has run
        _restart_same_ports(server)
        assert _committed_at(uri) == [0, 1]
        run_job(
            "--root",
            uri,
            "--local-root",
            str(local),
            "--restore",
            "--no-wait-upload",
            "--list",
            "--dump",
            str(work / "b"),
        )
        resumed = json.loads((work / "b" / "resume.json").read_text())
        assert resumed["step"] == 3 and resumed["uri"].startswith(str(local)), resumed
        assert_same_tensors(dump / "saved_3.safetensors", work / "b" / "restored.safetensors")
        tiers = json.loads((work / "b" / "tiers.json").read_text())
        # local_keep_last=2: 0 and 1 left the local tier once promoted; 2 and 3 wait for S3
        assert tiers == {"0": ["root"], "1": ["root"], "2": ["local"], "3": ["local"]}, tiers
        os.kill(uploader, signal.SIGCONT)  # S3 is back: the promotion catches up
        wait_for(lambda: _committed_at(uri) == [0, 1, 2, 3], 90, "steps 2 and 3 promoted after the outage")
        assert verify_checkpoint(open_backend(uri), "step_000000003").ok
    finally:
        server.stop()
