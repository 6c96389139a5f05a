"""A live job keeps its run however rarely it saves; a dead one loses it (issue 12).

Real processes throughout: the owner is ``_lock_job.py`` saving step 1 and then idling (only its
heartbeat thread touches ``LOCK``); intruders are a second manager, ``dist-ckpt gc`` or another
``_lock_job.py``, on this host or in another UTS namespace (another host name). Before the fix the
heartbeat moved only at saves and a same-host owner was judged by its heartbeat's age, so every
intruder below took the run after ``lock_stale_after`` seconds and gc removed the live job's
in-flight staging folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _fault_lib import QUIET, assert_named_error, check_run, wait_for
from _lock_lib import (
    OTHER_HOST,
    assert_other_host,
    files_under,
    line,
    lock_record,
    merged_refs,
    require_unshare,
    start_lock_job,
)

import dist_ckpt
from dist_ckpt.errors import RunLocked
from storage_backends import open_backend

pytestmark = QUIET
STALE = 1.0  # lock_stale_after of every job here (seconds)


def _cli(*args: str, other_host: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dist_ckpt.cli", *args]
    if other_host:
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _gc(root: Path, *extra: str, other_host: bool = False) -> subprocess.CompletedProcess[str]:
    return _cli("gc", str(root), *extra, other_host=other_host)


def _plant_leftover(root: Path) -> Path:
    """A staging folder of an interrupted save: what gc removes when it runs."""
    leftover = root / "step_000000009.tmp-0123456789ab" / "rank_00000.safetensors"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    return leftover


def _owner(tmp: Path, root: Path, *extra: str):  # noqa: ANN202
    return start_lock_job(
        tmp,
        "owner",
        "owner",
        "--root",
        str(root),
        "--refs",
        str(tmp / "owner_refs"),
        "--stale-after",
        str(STALE),
        "--go",
        str(tmp / "go"),
        *extra,
    )


def test_same_host_idle_owner_keeps_the_run(tmp_path: Path) -> None:
    """Idle 10x lock_stale_after: a second manager gets RunLocked, `dist-ckpt gc|prune|copy` exit 6
    naming the owner and its last heartbeat and change nothing, the owner's next save succeeds."""
    root = tmp_path / "run"
    owner = _owner(tmp_path, root)
    try:
        line(owner, "SAVED 1")
        leftover = _plant_leftover(root)
        time.sleep(10 * STALE)  # idle for 10x lock_stale_after
        before = files_under(root)
        with pytest.raises(RunLocked) as err:
            dist_ckpt.CheckpointManager(str(root), best={"loss": "min"}, lock_stale_after=STALE)
        assert_named_error(err.value, str(root), "LOCK", f":{owner.proc.pid}:", "last heartbeat")
        dist_ckpt.save({"w": torch.ones(4)}, str(tmp_path / "other" / "step_000000005"))
        with ThreadPoolExecutor(3) as pool:  # each imports torch: in parallel
            tools = list(
                pool.map(
                    lambda a: _cli(*a),
                    [
                        ("gc", str(root)),
                        ("prune", str(root), "--keep-last", "1"),
                        ("copy", str(tmp_path / "other" / "step_000000005"), str(root)),
                    ],
                )
            )
        for tool in tools:
            assert tool.returncode == 6, (tool.args, tool.returncode, tool.stdout, tool.stderr)
            assert "being written by another job" in tool.stderr and f":{owner.proc.pid}:" in tool.stderr, tool.stderr
            assert "last heartbeat" in tool.stderr and "--break-lock" in tool.stderr, tool.stderr
        assert files_under(root) == before and leftover.exists()  # gc, prune and copy changed nothing
        (tmp_path / "go").touch()
        line(owner, "SAVED 2")  # the owner's next save succeeds
        assert owner.wait(120) == 0, owner.output()
    finally:
        owner.kill()
    check_run(str(root), tmp_path / "owner_refs", expect_last=2)


def test_owner_on_another_host_keeps_the_run_while_it_heartbeats(tmp_path: Path) -> None:
    require_unshare()
    root = tmp_path / "run"
    owner = _owner(tmp_path, root)
    try:
        line(owner, "SAVED 1")
        time.sleep(5 * STALE)  # idle beyond lock_stale_after
        assert time.time() - lock_record(open_backend(str(root))).heartbeat < STALE  # its heartbeat thread runs
        intruder = start_lock_job(
            tmp_path,
            "intruder",
            "intruder",
            "--root",
            str(root),
            "--refs",
            str(tmp_path / "intruder_refs"),
            "--stale-after",
            str(STALE),
            "--retry",
            str(3 * STALE),
            "--save",
            "2",
            other_host=True,
        )
        assert intruder.wait(120) == 3, intruder.output()
        assert_other_host(intruder)
        message = line(intruder, "RUNLOCKED")
        assert f":{owner.proc.pid}:" in message and "last heartbeat" in message, message
        gc = _gc(root, other_host=True)
        assert gc.returncode == 6 and f":{owner.proc.pid}:" in gc.stderr, (gc.returncode, gc.stderr)
        (tmp_path / "go").touch()
        line(owner, "SAVED 2")
        assert owner.wait(120) == 0, owner.output()
    finally:
        owner.kill()
    check_run(str(root), tmp_path / "owner_refs", expect_last=2)


def test_dead_owner_on_another_host_is_taken_over_after_lock_stale_after(tmp_path: Path) -> None:
    require_unshare()
    root = tmp_path / "run"
    owner = _owner(tmp_path, root)
    try:
        owner_token = line(owner, "OWNER")
        line(owner, "SAVED 1")
        time.sleep(2 * STALE)
    finally:
        owner.kill()  # SIGKILL: no close(), no atexit; LOCK stays, its heartbeat stops
    held = lock_record(open_backend(str(root)))
    assert held.owner == owner_token
    intruder = start_lock_job(
        tmp_path,
        "intruder",
        "intruder",
        "--root",
        str(root),
        "--refs",
        str(tmp_path / "intruder_refs"),
        "--stale-after",
        str(STALE),
        "--retry",
        "60",
        "--save",
        "2",
        other_host=True,
    )
    try:
        assert intruder.wait(120) == 0, intruder.output()
    finally:
        intruder.kill()
    assert_other_host(intruder)
    got = json.loads(line(intruder, "ACQUIRED"))
    assert got["held_heartbeat"] == pytest.approx(held.heartbeat)  # it took over the dead owner's lock
    waited = got["time"] - held.heartbeat
    assert STALE <= waited < STALE + 60, waited  # not before lock_stale_after without heartbeat
    assert got["owner"].startswith(f"{OTHER_HOST}:")
    assert line(intruder, "RESUMED") == "1" and line(intruder, "SAVED") == "2"
    check_run(
        str(root), merged_refs(tmp_path, {1: tmp_path / "owner_refs", 2: tmp_path / "intruder_refs"}), expect_last=2
    )


def test_gc_leaves_an_in_flight_async_save_of_a_live_owner_alone(tmp_path: Path) -> None:
    root = tmp_path / "run"
    owner = _owner(tmp_path, root, "--async-save", "--hold-write", str(tmp_path / "write"))
    (tmp_path / "go").touch()  # step 2 at once: its shard commit then blocks on --hold-write
    try:
        line(owner, "SAVED 1")
        line(owner, "INFLIGHT")
        staging = [p for p in root.iterdir() if p.name.startswith("step_000000002.tmp-")]
        assert len(staging) == 1, sorted(p.name for p in root.iterdir())
        time.sleep(5 * STALE)  # the save stays in flight beyond lock_stale_after
        before = files_under(root)
        assert any(k.startswith(staging[0].name + "/") for k in before), before  # the shard being written
        gc = _gc(root)
        assert gc.returncode == 6, (gc.returncode, gc.stdout, gc.stderr)
        assert f":{owner.proc.pid}:" in gc.stderr and "last heartbeat" in gc.stderr, gc.stderr
        # a second job's manager would garbage-collect at its start: it gets RunLocked first
        with pytest.raises(RunLocked):
            dist_ckpt.CheckpointManager(str(root), best={"loss": "min"}, lock_stale_after=STALE)
        assert files_under(root) == before  # nothing of the in-flight save was removed
        (tmp_path / "write").touch()
        line(owner, "SAVED 2")
        assert owner.wait(120) == 0, owner.output()
    finally:
        owner.kill()
    check_run(str(root), tmp_path / "owner_refs", expect_last=2)


def test_break_lock_takes_a_live_owners_run_and_fences_it(tmp_path: Path) -> None:
    """``--break-lock`` (dangerous) takes the lock although its owner is alive; the owner's next
    save then fails with RunLocked naming the breaker and commits nothing."""
    root = tmp_path / "run"
    owner = _owner(tmp_path, root)
    try:
        line(owner, "SAVED 1")
        leftover = _plant_leftover(root)
        gc = _gc(root, "--break-lock")
        assert gc.returncode == 0 and "removed temp folder" in gc.stdout, (gc.returncode, gc.stdout, gc.stderr)
        assert "broke the run lock" in gc.stderr and not leftover.exists()
        # gc released the lock it broke: a third job could take the run now; the owner must not write
        (tmp_path / "go").touch()
        assert owner.wait(120) == 3, owner.output()
        assert "lost the run's writer lock" in line(owner, "RUNLOCKED")
    finally:
        owner.kill()
    wait_for(lambda: owner.proc.poll() is not None, 30, "the owner to exit")
    assert not (root / "step_000000002").exists()
    assert not [p for p in root.glob("step_000000002*/COMMITTED")]
    check_run(str(root), tmp_path / "owner_refs", expect_last=1)
