"""Lightning DDP (2 CPU processes) through DistCkptIO: a fit SIGKILLed mid-run and resumed
with ``trainer.fit(ckpt_path="last")`` ends bit-identical to an uninterrupted fit, from a
local dirpath and from an s3:// dirpath on a real SeaweedFS server."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ckpt.checkpoint_files import COMMITTED
from dist_ckpt.integrations.lightning_run import committed_names, last_step
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

JOB = Path(__file__).parent / "_lightning_job.py"
STEPS = 32  # 8 epochs of 4 steps per rank (64 samples, 2 ranks, batch 8)
TIMEOUT = 300


def _start(dirpath: str, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
    cmd = [
        sys.executable,
        str(JOB),
        "--dirpath",
        dirpath,
        "--progress",
        str(tmp / f"{name}.progress"),
        "--final-out",
        str(tmp / f"{name}.st"),
    ]
    # its own session: Lightning's rank-1 process is a child, and killpg reaches both
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)


def _finish(proc: subprocess.Popen[bytes], tmp: Path, name: str) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, (tmp / f"{name}.log").read_text()[-4000:]


def _progress(tmp: Path, name: str) -> int:
    try:
        return int((tmp / f"{name}.progress").read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def _kill_after_step(proc: subprocess.Popen[bytes], tmp: Path, name: str, step: int, run: str) -> None:
    """SIGKILL the job once it passed ``step`` and has committed a checkpoint (on S3 the first
    async commit may still be in flight at any given step)."""
    deadline = time.monotonic() + TIMEOUT
    backend = open_backend(run)
    while _progress(tmp, name) < step or last_step(backend) is None:
        assert proc.poll() is None, (tmp / f"{name}.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the job did not reach the step to kill at"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, both ranks, no cleanup
    proc.wait(timeout=30)


def _kill_and_resume(dirpath: str, tmp: Path) -> None:
    _finish(_start(str(tmp / "a_run") if not dirpath.startswith("s3://") else dirpath + "-a", tmp, "a"), tmp, "a")
    run_b = dirpath if not dirpath.startswith("s3://") else dirpath + "-b"
    kill_at = random.Random().randrange(6, STEPS - 6)
    _kill_after_step(_start(run_b, tmp, "b"), tmp, "b", kill_at, run_b)

    backend = open_backend(run_b)
    # `last` never names an uncommitted step: the manifest (and the markers) name a committed one
    manifest, _ = RunStore(backend).read_manifest()
    committed_before = last_step(backend)
    assert committed_before is not None, f"killed at step {kill_at} before any checkpoint was committed"
    if manifest is not None and "last" in manifest.pointers:  # (killed before the first manifest update: none)
        assert backend.exists(f"{step_prefix(manifest.pointers['last'])}/{COMMITTED}")
        assert manifest.pointers["last"] <= committed_before
    assert committed_before < STEPS, f"the job finished before the kill (asked at step {kill_at})"

    _finish(_start(run_b, tmp, "b"), tmp, "b")  # the same command: ckpt_path="last"
    log = (tmp / "b.log").read_text()
    assert "last.ckpt" in log and "Restored all states" in log, log[-3000:]

    a, b = load_file(tmp / "a.st"), load_file(tmp / "b.st")
    assert sorted(a) == sorted(b) and any(k.endswith("exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), (
            f"{key} differs (killed after step {kill_at}, resumed from {committed_before})"
        )

    # retention after the resume: the top 2 by val_loss and last, nothing else; the run verifies
    manifest, _ = RunStore(backend).read_manifest()
    assert manifest is not None and manifest.pointers["last"] == STEPS
    names = committed_names(backend)
    ranked = sorted((e.metrics["val_loss"], e.step) for e in manifest.entries if "val_loss" in e.metrics)
    assert set(names) <= {s for _, s in ranked[:2]} | {STEPS}
    assert manifest.pointers["best:val_loss"] == ranked[0][1]
    assert verify_run(backend).ok


@pytest.mark.slow
def test_ddp_fit_killed_and_resumed_from_last_is_bit_identical_local(tmp_path: Path) -> None:
    _kill_and_resume(str(tmp_path / "b_run"), tmp_path)


@pytest.mark.slow
def test_ddp_fit_killed_and_resumed_from_last_is_bit_identical_s3(s3_uri: str, tmp_path: Path) -> None:
    _kill_and_resume(s3_uri, tmp_path)
