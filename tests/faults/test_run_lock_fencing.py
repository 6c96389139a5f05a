"""Fencing: a job that lost the run lock makes nothing visible (issue 12), on local disk and S3.

The owner (a real process) saves step 1, starts saving step 2 and — all shards written, right
before its metadata.json — stops itself with a real SIGSTOP (heartbeat thread included). Once
that lasted longer than ``lock_stale_after``, an intruder in another UTS namespace (another host
name, so the owner's liveness is judged by heartbeat age) takes the lock over, removes the
owner's staging as a leftover, resumes from step 1 and saves step 3, and keeps the run open.
Then the owner is continued mid-save: its commit's fence (a conditional write of the lock)
fails, so its save raises RunLocked naming the intruder, its step 2 never becomes visible, and
the intruder's checkpoints and manifest are intact and verify clean, bit for bit. (Without the
fence the owner committed step 2 — on S3 a visible step whose shards the intruder's gc had
already removed.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_named_error, check_run, committed_steps
from _lock_lib import (
    OTHER_HOST,
    assert_other_host,
    line,
    lock_record,
    merged_refs,
    require_unshare,
    sigcont,
    start_lock_job,
    wait_stopped,
)
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt.errors import RunLocked
from dist_ckpt.run_lock import RunLock
from dist_ckpt.run_store import MANIFEST
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = QUIET
STALE = 1.0


@pytest.fixture(params=["local", "s3"])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_uri")  # SeaweedFS; its AWS_* settings reach the subprocesses


def test_owner_stopped_past_lock_stale_after_cannot_commit_after_a_takeover(run_root: str, tmp_path: Path) -> None:
    require_unshare()
    backend = open_backend(run_root)
    owner = start_lock_job(
        tmp_path,
        "owner",
        "owner",
        "--root",
        run_root,
        "--refs",
        str(tmp_path / "owner_refs"),
        "--stale-after",
        str(STALE),
        "--pause-at-commit",
    )
    intruder = None
    try:
        owner_token = line(owner, "OWNER")
        line(owner, "SAVED 1")
        line(owner, "PAUSED")
        wait_stopped(owner.proc.pid)
        time.sleep(2 * STALE)  # stopped longer than lock_stale_after: its heartbeat is stale
        assert lock_record(backend).owner == owner_token
        intruder = start_lock_job(
            tmp_path,
            "intruder",
            "intruder",
            "--root",
            run_root,
            "--refs",
            str(tmp_path / "intruder_refs"),
            "--stale-after",
            str(STALE),
            "--retry",
            "30",
            "--save",
            "3",
            "--hold",
            str(tmp_path / "release"),
            other_host=True,
        )
        assert_other_host(intruder)
        intruder_token = json.loads(line(intruder, "ACQUIRED"))["owner"]
        assert intruder_token.startswith(f"{OTHER_HOST}:")
        assert line(intruder, "SAVED 3") == ""
        intruders_manifest = backend.read(MANIFEST)
        sigcont(owner.proc.pid)  # mid-save: it goes on to metadata.json, then its commit's fence
        owner.wait(120)
        assert "CONTINUED" in owner.output()
        # the owner's step 2 never became visible; the manifest is the intruder's, untouched
        assert committed_steps(backend) == [1, 3], owner.output()
        assert backend.read(MANIFEST) == intruders_manifest
        assert owner.proc.returncode == 3, owner.output()
        message = line(owner, "RUNLOCKED")
        assert intruder_token in message and "lost the run's writer lock" in message, message
        assert lock_record(backend).owner == intruder_token  # the loser did not release the winner's lock
        (tmp_path / "release").touch()
        assert intruder.wait(120) == 0, intruder.output()
    finally:
        sigcont(owner.proc.pid)
        owner.kill()
        if intruder is not None:
            intruder.kill()
    report = verify_run(backend)
    assert report.ok, json.dumps(report.to_json(), indent=1)[:4000]
    refs = merged_refs(tmp_path, {1: tmp_path / "owner_refs", 3: tmp_path / "intruder_refs"})
    check_run(run_root, refs, expect_last=3)  # bit-identical: step 1 the owner's, step 3 the intruder's


@pytest.mark.parametrize("async_mode", ["thread", "process"])
def test_async_save_in_flight_when_the_lock_is_taken_commits_nothing(tmp_path: Path, async_mode: str) -> None:
    """The fence travels with an async save — to the worker thread, or pickled to the writer
    process — and is checked there right before COMMITTED."""
    root = str(tmp_path / "run")
    slow = Rule("writer.write", "step_000000002*/rank_*", "delay", delay=2.0, count=1)  # picklable: reaches the process
    job = LocalJob(
        root,
        tmp_path / "refs",
        backend=FaultyBackend(open_backend(root), [slow]),
        async_save=True,
        async_mode=async_mode,
        lock_stale_after=STALE,
    )
    thief = RunLock(open_backend(root), STALE)
    try:
        job.save(1)
        job.mgr.wait()
        manifest = open_backend(root).read(MANIFEST)
        assert job.save(2)  # staged; the write runs in the background, slowed down
        thief.acquire(break_lock=True)  # another job takes the lock while step 2 is being written
        with pytest.raises(RunLocked) as err:
            job.mgr.wait()
        assert_named_error(err.value, "step 2", thief.info.owner, "lost the run's writer lock")
        assert committed_steps(open_backend(root)) == [1]
        assert open_backend(root).read(MANIFEST) == manifest
        with pytest.raises(RunLocked):  # and every later save stops at once, writing nothing
            job.mgr.save(3, job.state, force=True)
        job.pending = None
        job.mgr.close()
    finally:
        thief.release()
    check_run(root, tmp_path / "refs", expect_last=1)
