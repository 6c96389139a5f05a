"""The run lock's own life cycle, with real processes: the heartbeat thread runs while idle and
stops on release and at interpreter exit; a same-host owner that is gone (dead, or a zombie not
yet reaped) loses the lock at once; a lock record of an older version still parses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dist_ckpt.errors import RunLocked
from dist_ckpt.run_lock import LOCK, LockInfo, RunLock
from storage_backends import open_backend

HOLDER = """
import sys, time
from dist_ckpt.run_lock import RunLock
from storage_backends import open_backend
lock = RunLock(open_backend(sys.argv[1]), float(sys.argv[2]))
lock.acquire()
print("HELD", lock.info.owner, flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)  # no release(): the atexit handler must do it
time.sleep(120)
"""


def _holder(root: Path, stale_after: float, mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(stale_after), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().split()
    assert first[:1] == ["HELD"], first
    return proc, first[1]


def _record(root: Path) -> LockInfo:
    held = LockInfo.parse((root / LOCK).read_bytes())
    assert held is not None
    return held


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dist_ckpt-lock-heartbeat")]


def test_heartbeat_runs_while_idle_and_stops_on_release(tmp_path: Path) -> None:
    before = set(_heartbeat_threads())
    lock = RunLock(open_backend(str(tmp_path)), stale_after=0.4)
    lock.acquire()
    first = _record(tmp_path).heartbeat
    time.sleep(0.6)  # about six beats of lock_stale_after / 4
    assert _record(tmp_path).heartbeat > first
    assert len(set(_heartbeat_threads()) - before) == 1
    lock.release()
    assert set(_heartbeat_threads()) - before == set()
    assert not (tmp_path / LOCK).exists()


def test_lock_is_released_at_interpreter_exit(tmp_path: Path) -> None:
    proc, _ = _holder(tmp_path, 600, "exit")
    assert proc.wait(60) == 0
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("reap", [True, False], ids=["dead", "zombie"])
def test_a_gone_same_host_owner_loses_the_lock_at_once(tmp_path: Path, reap: bool) -> None:
    proc, token = _holder(tmp_path, 600, "hold")
    try:
        with pytest.raises(RunLocked) as err:  # alive: kept, although lock_stale_after is long past for us
            RunLock(open_backend(str(tmp_path)), stale_after=0.01).acquire()
        assert token in str(err.value) and "last heartbeat" in str(err.value)
        os.kill(proc.pid, signal.SIGKILL)
        if reap:
            proc.wait(30)
        else:  # killed, not yet reaped: kill(pid, 0) would still succeed
            deadline = time.monotonic() + 30
            while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline, "the holder did not become a zombie"
                time.sleep(0.02)
        assert _record(tmp_path).owner == token
        lock = RunLock(open_backend(str(tmp_path)), stale_after=600)  # the heartbeat's age does not matter
        lock.acquire()
        assert _record(tmp_path).owner == lock.info.owner
        lock.release()
    finally:
        proc.kill()
        proc.wait(30)


def test_record_of_an_older_version_parses() -> None:
    old = b'{"owner": "h:1:abc", "host": "h", "pid": 1, "time": 1.0, "heartbeat": 2.0}'
    held = LockInfo.parse(old)
    assert held is not None and held.owner == "h:1:abc" and held.boot_id == "" and held.stale_after == 0.0
    assert LockInfo.parse(b"\x80\x04not json") is None
