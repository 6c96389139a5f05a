"""Shared pieces of the run-lock tests: starting ``_lock_job.py`` on this host or in another UTS
namespace (``unshare --uts`` + ``hostname``: another host name, same machine — which is exactly
what a job on another host looks like to the lock), reading the lock, and merging the two jobs'
reference dumps for ``check_run``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _fault_lib import Job, wait_for

from dist_ckpt.run_lock import LOCK, LockInfo
from storage_backends import Backend
from storage_backends.local_io import PART_MARK

HERE = Path(__file__).resolve().parent
LOCK_JOB = HERE / "_lock_job.py"
OTHER_HOST = "dist-ckpt-other-host"


def require_unshare() -> None:
    """Fail (never skip) when another UTS namespace cannot be made here: these tests need root
    and ``unshare`` (util-linux); in a container, CAP_SYS_ADMIN."""
    cmd = ["unshare", "--uts", "sh", "-c", f"hostname {OTHER_HOST} && hostname"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(
            f"cannot run the intruder in another UTS namespace ({' '.join(cmd)}): {e}; "
            "these tests need root and util-linux's unshare",
            pytrace=False,
        )
    if r.returncode != 0 or r.stdout.strip() != OTHER_HOST:
        pytest.fail(
            f"cannot run the intruder in another UTS namespace ({' '.join(cmd)}): rc={r.returncode} "
            f"{r.stderr.strip()}; these tests need root (CAP_SYS_ADMIN) and util-linux's unshare",
            pytrace=False,
        )


def start_lock_job(tmp: Path, name: str, role: str, *args: str, other_host: bool = False) -> Job:
    """``_lock_job.py ROLE ARGS`` in its own session (output in ``tmp/name.log``); with
    ``other_host`` inside ``unshare --uts`` with the host name :data:`OTHER_HOST`."""
    cmd = [sys.executable, str(LOCK_JOB), role, *args]
    if other_host:
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST, *cmd]
    log = tmp / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DIST_CKPT_FAULTS", None)
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    return Job(proc, log, tmp)


def line(job: Job, prefix: str, timeout: float = 120.0) -> str:
    """The rest of the first output line of ``job`` starting with ``prefix`` (waits for it)."""

    def find() -> str | None:
        for text in job.output().splitlines():
            if text.startswith(prefix + " ") or text == prefix:
                return text[len(prefix) :].strip()
        return None

    if find() is None:
        wait_for(lambda: find() is not None or job.proc.poll() is not None, timeout, f"{prefix!r} from {job.log.name}")
    found = find()
    assert found is not None, (
        f"{job.log.name} exited ({job.proc.returncode}) without printing {prefix!r}:\n{job.output()}"
    )
    return found


def assert_other_host(job: Job) -> None:
    host = line(job, "HOST")
    assert host == OTHER_HOST and host != socket.gethostname(), host
    print(f"{job.log.name}: ran in another UTS namespace: hostname {host!r} (this host: {socket.gethostname()!r})")


def lock_record(backend: Backend) -> LockInfo:
    found = backend.read_versioned(LOCK)
    assert found is not None, f"{backend.uri}/{LOCK} is missing"
    held = LockInfo.parse(found.data)
    assert held is not None, found.data
    return held


def wait_stopped(pid: int, timeout: float = 60.0) -> None:
    """Until ``pid`` is in state T (stopped by a signal)."""

    def stopped() -> bool:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    wait_for(stopped, timeout, f"pid {pid} to stop")


def sigcont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def merged_refs(tmp: Path, sources: dict[int, Path]) -> Path:
    """One refs folder for ``check_run``: step N's dump (and acknowledgement) from ``sources[N]``."""
    out = tmp / "refs_merged"
    out.mkdir(exist_ok=True)
    for step, folder in sources.items():
        shutil.copy(folder / f"step_{step}.safetensors", out / f"step_{step}.safetensors")
        (out / f"step_{step}.returned").write_text("ok")
    return out


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` but ``LOCK`` (whose heartbeat moves) and the heartbeat's own
    transient files: its temporary ``[.]LOCK.part-*`` (written, then renamed over LOCK: it may
    vanish between the listing and its stat — CI saw that) and ``LOCK.lock``, the lock file of
    the heartbeat's compare-and-swap (held for the milliseconds of one renewal): size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.name not in (LOCK, f"{LOCK}.lock") and not p.name.lstrip(".").startswith(LOCK + PART_MARK) and p.is_file()
    }
