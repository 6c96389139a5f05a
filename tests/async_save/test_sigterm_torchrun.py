"""A real SIGTERM to a 2-rank torchrun job mid-training (async saves, ``--save-on-sigterm``):
both ranks save the current step, the job exits non-zero, and the run resumed from that
checkpoint equals an uninterrupted run bit for bit (losses, parameters, optimizer state)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from async_helpers import committed_steps
from exactness import EXAMPLES, compare, read_losses, torchrun

STEPS = 40
ARGS = ["--steps", str(STEPS), "--save-every", "8", "--keep-last", "2", "--async", "--save-on-sigterm"]


def test_sigterm_saves_the_current_step_and_resume_is_exact(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a, b = tmp_path / "a", tmp_path / "b"
    rc = torchrun(
        "train_ddp.py", 2, [*ARGS, "--ckpt", str(a), "--losses-out", f"{a}.jsonl", "--final-out", f"{a}.st"], log=log
    )
    assert rc == 0, log.read_text()[-3000:]

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "train_ddp.py"),
        *ARGS,
        "--ckpt",
        str(b),
        "--losses-out",
        f"{b}.jsonl",
        "--step-delay",
        "0.15",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        job = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            losses = Path(f"{b}.jsonl")
            while not (losses.exists() and len(losses.read_text().splitlines()) >= 12):
                assert job.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.05)
            job.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both ranks
            rc = job.wait(timeout=90)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert rc != 0, "a preempted job exits non-zero"
    text = log.read_text()
    assert "SIGTERM received: stopping" in text or "exitcode: 143" in text or rc != 0
    trained = max(read_losses(Path(f"{b}.jsonl")))
    assert trained < STEPS - 1, "the signal arrived mid-training"
    assert committed_steps(b)[-1] == trained, f"the current step {trained} was saved: {committed_steps(b)}"

    rc = torchrun(
        "train_ddp.py",
        2,
        [*ARGS, "--ckpt", str(b), "--resume", "auto", "--losses-out", f"{b}.jsonl", "--final-out", f"{b}.st"],
        log=log,
    )
    assert rc == 0, log.read_text()[-3000:]
    result = compare(Path(f"{a}.jsonl"), Path(f"{b}.jsonl"), Path(f"{a}.st"), Path(f"{b}.st"))
    assert result.steps_compared == STEPS
    assert result.identical, f"stopped at {trained}: {result.first_difference}"
