"""storage_backends.local.LocalBackend on a real directory: create-if-absent, compare-and-swap,
the lock file, staging and publishing, unfinished uploads, fsync."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage_backends import (
    BackendError,
    ObjectExists,
    PreconditionFailed,
)
from storage_backends.local import LocalBackend


@pytest.fixture
def be(tmp_path: Path) -> LocalBackend:
    return LocalBackend(str(tmp_path / "root"))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --- create_if_absent and compare_and_swap ---------------------------------------------------


def test_create_if_absent(be):
    be.create_if_absent("d/COMMITTED", b"one")
    with pytest.raises(ObjectExists) as info:
        be.create_if_absent("d/COMMITTED", b"two")
    assert info.value.key == "d/COMMITTED"
    assert be.read("d/COMMITTED") == b"one"
    assert files_under(Path(be.root)) == ["d/COMMITTED"]  # no temp file left behind


def test_create_if_absent_from_threads_exactly_one_wins(be):
    n = 16
    barrier = threading.Barrier(n)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            be.create_if_absent("race/COMMITTED", f"writer {i}".encode())
            return "won"
        except ObjectExists:
            return "lost"

    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(attempt, range(n)))
    assert outcomes.count("won") == 1, outcomes
    winner = outcomes.index("won")
    assert be.read("race/COMMITTED") == f"writer {winner}".encode()
    assert files_under(Path(be.root)) == ["race/COMMITTED"]


def test_compare_and_swap(be):
    v1 = be.compare_and_swap("manifest.json", b"v1", None)
    got = be.read_versioned("manifest.json")
    assert got is not None and got.data == b"v1" and got.version == v1
    v2 = be.compare_and_swap("manifest.json", b"v2", v1)
    assert v2 != v1
    with pytest.raises(PreconditionFailed):
        be.compare_and_swap("manifest.json", b"stale", v1)  # v1 is no longer current
    with pytest.raises(PreconditionFailed):
        be.compare_and_swap("manifest.json", b"again", None)  # exists already
    assert be.read("manifest.json") == b"v2"
    assert not be.exists("manifest.json.lock")  # the lock is dropped after every call


def test_compare_and_swap_from_threads_no_lost_update(be):
    be.compare_and_swap("counter", b"0", None)

    def increment(_: int) -> int:
        retries = 0
        while True:
            cur = be.read_versioned("counter")
            assert cur is not None
            try:
                be.compare_and_swap("counter", str(int(cur.data) + 1).encode(), cur.version)
                return retries
            except PreconditionFailed:
                retries += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(increment, range(40)))
    assert be.read("counter") == b"40"


def test_lock_file_holds_owner_and_time(be):
    before = time.time()
    with be.lock("run.lock"):
        doc = json.loads(Path(be.root, "run.lock").read_text())
        assert doc["owner"].startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert before - 1 <= doc["time"] <= time.time() + 1
    assert not Path(be.root, "run.lock").exists()


def test_lock_is_exclusive_and_times_out(be):
    with be.lock("run.lock"):
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"held by another writer") as info:
            with be.lock("run.lock", timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
        assert info.value.code == "Locked"
        assert "owner" in str(info.value)  # names the holder


def test_stale_lock_is_taken_over(tmp_path):
    be = LocalBackend(str(tmp_path), lock_stale_after=5.0)
    path = tmp_path / "manifest.json.lock"
    path.write_text(json.dumps({"owner": "deadhost:1:dead", "time": time.time() - 3600}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    v = be.compare_and_swap("manifest.json", b"data", None)  # would time out if not taken over
    assert be.read_versioned("manifest.json").version == v
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # the stale copy is removed


def test_fresh_lock_is_not_taken_over(tmp_path):
    be = LocalBackend(str(tmp_path), lock_stale_after=60.0)
    (tmp_path / "manifest.json.lock").write_text(json.dumps({"owner": "alive:1:x", "time": time.time()}))
    with pytest.raises(BackendError, match=r"alive:1:x"):
        with be.lock("manifest.json.lock", timeout=0.2):
            pass
    assert (tmp_path / "manifest.json.lock").exists()


# --- staging and publishing ------------------------------------------------------------------


def test_staging_prefix_and_publish(be):
    staging = be.staging_prefix("step_000000100", "abc123")
    assert staging == "step_000000100.tmp-abc123"
    be.write_bytes(f"{staging}/rank_00000.safetensors", b"shard")
    be.create_if_absent(f"{staging}/COMMITTED", b"{}")
    assert not be.exists("step_000000100/COMMITTED")
    be.publish(staging, "step_000000100")
    assert be.read("step_000000100/rank_00000.safetensors") == b"shard"
    assert be.exists("step_000000100/COMMITTED")
    assert not Path(be.root, staging).exists()


def test_publish_onto_an_existing_final_raises_object_exists(be):
    be.write_bytes("step_1/COMMITTED", b"first")
    staging = be.staging_prefix("step_1", "second")
    be.write_bytes(f"{staging}/COMMITTED", b"second")
    with pytest.raises(ObjectExists):
        be.publish(staging, "step_1")
    assert be.read("step_1/COMMITTED") == b"first"  # the committed step is untouched
    assert be.read(f"{staging}/COMMITTED") == b"second"


def test_publish_onto_an_existing_empty_final_dir_raises_object_exists(be):
    Path(be.root, "step_1").mkdir(parents=True)
    be.write_bytes("step_1.tmp-a/x", b"x")
    with pytest.raises(ObjectExists):
        be.publish("step_1.tmp-a", "step_1")


def test_publish_of_missing_staging_fails(be):
    with pytest.raises(BackendError):
        be.publish("step_9.tmp-nothing", "step_9")
    assert not Path(be.root, "step_9").exists()


# --- unfinished uploads ----------------------------------------------------------------------


def test_abandoned_uploads_and_abort_uploads(be):
    w1 = be.open_writer("step_1.tmp-a/rank_00000.safetensors")
    w1.write(b"partial")
    w2 = be.open_writer("step_2.tmp-b/rank_00000.safetensors")
    w2.write(b"partial")
    be.write_bytes("step_1.tmp-a/done", b"ok")
    found = sorted(be.abandoned_uploads())
    assert len(found) == 2 and all(".part-" in k for k in found)
    assert [k for k in found if k.startswith("step_1.tmp-a/")] == list(be.abandoned_uploads("step_1.tmp-a/"))
    assert be.abort_uploads("step_1") == 1
    assert len(list(be.abandoned_uploads())) == 1
    assert be.read("step_1.tmp-a/done") == b"ok"  # finished objects are kept
    assert be.abort_uploads() == 1
    assert list(be.abandoned_uploads()) == []


def test_fsync_can_be_disabled(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    LocalBackend(str(tmp_path / "a"), fsync=False).write_bytes("k", b"v")
    assert calls == []
    LocalBackend(str(tmp_path / "b")).write_bytes("k", b"v")
    assert len(calls) >= 2  # the file and its directory


def test_staging_folder_directory_syncs_are_left_to_publish(be, monkeypatch):
    """Inside step_X.tmp-<id> file data is fsynced at once, but directory syncs are deferred to
    publish(), which syncs the staged tree before the rename and the parent after it."""
    import storage_backends.local as local
    import storage_backends.local_io as local_io

    be.write_bytes("keep", b"x")  # the run root exists
    dir_syncs: list[str] = []
    file_syncs: list[int] = []
    real_fsync_dir = local_io.fsync_dir

    def counting_fsync_dir(p: str) -> None:
        dir_syncs.append(os.path.relpath(p, be.root))
        real_fsync_dir(p)

    for module in (local, local_io):  # the writer lives in local_io, publish in local
        monkeypatch.setattr(module, "fsync_dir", counting_fsync_dir)
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (file_syncs.append(fd), real_fsync(fd)))

    staging = be.staging_prefix("step_7", "abc")
    w = be.open_writer(f"{staging}/rank_00000.safetensors")
    w.write(b"shard")
    w.commit()
    be.create_if_absent(f"{staging}/metadata.json", b"{}")
    be.create_if_absent(f"{staging}/COMMITTED", b"{}")
    assert dir_syncs == []
    assert len(file_syncs) == 3  # every file's data, immediately

    be.publish(staging, "step_7")
    assert dir_syncs == [staging, "."]  # the staged folder, then the parent after the rename
    assert be.in_staging(os.path.join(be.root, staging, "x")) and not be.in_staging(
        os.path.join(be.root, "step_7", "x")
    )

    dir_syncs.clear()
    be.create_if_absent("step_7/extra", b"{}")  # outside staging: synced at once
    assert dir_syncs == ["step_7"]


def test_compare_and_swap_syncs_the_new_content_not_its_lock_file(be, monkeypatch):
    """A compare-and-swap (the manifest, the run lock's heartbeat: three per save on rank 0)
    makes the new content durable — its data, then its directory after the rename — but not the
    lock file of its critical section: the exclusion is the O_EXCL create, and a lock file left
    by a crash is stale by its mtime whatever its body holds (the test below takes one over)."""
    import storage_backends.local as local
    import storage_backends.local_io as local_io

    version = be.compare_and_swap("manifest.json", b"v1", None)
    synced: list[str] = []
    real_fsync, real_fsync_dir = os.fsync, local_io.fsync_dir

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):  # directories are counted by fsync_dir
            synced.append(os.path.basename(path))
        real_fsync(fd)

    def fsync_dir(p: str) -> None:
        synced.append(f"dir:{os.path.relpath(p, be.root)}")
        real_fsync_dir(p)

    monkeypatch.setattr(os, "fsync", fsync)
    for module in (local, local_io):
        monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    be.compare_and_swap("manifest.json", b"v2", version)
    assert be.read("manifest.json") == b"v2"
    assert len(synced) == 2 and synced[0].startswith(".manifest.json") and synced[1] == "dir:.", synced
    assert not any(name.endswith(".lock") for name in synced)
