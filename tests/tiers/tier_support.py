"""Helpers of the tier tests: run the trainer job, find and reap uploader processes, read roots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

JOB = Path(__file__).with_name("_tier_job.py")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DIST_CKPT_UPLOADER_IDLE_S": "5"}


def start_job(*args: str) -> subprocess.Popen[str]:
    """The job in the background (stderr piped)."""
    return subprocess.Popen(
        [sys.executable, str(JOB), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
    )


def run_job(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"job exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def uploader_pid(local_root: Path) -> int | None:
    """The pid of the live uploader of ``local_root`` (its lock file), else None."""
    try:
        text = (local_root / ".tiers" / "uploader.lock").read_text().strip()
        pid = int(text)
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    if b"dist_ckpt.tiers.uploader" not in cmdline or b"Z" == _state(pid):
        return None
    return pid


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return b"X"


def kill_uploader(local_root: Path, sig: int = signal.SIGKILL) -> int | None:
    pid = uploader_pid(local_root)
    if pid is not None:
        os.kill(pid, sig)
    return pid


def reap_uploaders(base: Path) -> None:
    """Test teardown: end the uploaders of every local tier below ``base`` (by pid)."""
    for lock in base.rglob(".tiers/uploader.lock"):
        pid = uploader_pid(lock.parent.parent)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):  # noqa: ANN001,ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for k in x:
        assert torch.equal(x[k], y[k]), k
