"""Disk full: the run lives on a small tmpfs; saves go on until the file system is full. The
failing save raises StorageError naming the file and ENOSPC, leaves no partial step visible,
and every checkpoint committed before it loads bit-identical."""

from __future__ import annotations

from pathlib import Path

from _fault_lib import QUIET, LocalJob, assert_named_error, check_run, committed_steps

from dist_ckpt.errors import StorageError
from storage_backends import open_backend

pytestmark = QUIET


def test_disk_full(tmp_path: Path, mounts, capsys) -> None:
    mnt = tmp_path / "small-disk"
    why = mounts.tmpfs(mnt, "320k")
    backend = None
    if why is not None:
        from support.faulty_backend import FaultyBackend, Rule

        msg = f"tmpfs mount not permitted ({why}): injecting ENOSPC with the backend wrapper instead"
        with capsys.disabled():
            print(f"\n[test_disk_full] {msg}")
        mnt.mkdir(parents=True, exist_ok=True)
        backend = FaultyBackend(
            open_backend(str(mnt / "run")), [Rule("writer.write", "step_000000004*/*", "fail", error="ENOSPC")]
        )
    else:
        with capsys.disabled():
            print("\n[test_disk_full] saving onto a real 320 KiB tmpfs until it is full")
    root, refs = str(mnt / "run"), tmp_path / "refs"
    job = LocalJob(root, refs, backend=backend)
    failed_at, error = None, None
    for step in range(1, 40):
        try:
            job.save(step)
        except StorageError as e:
            failed_at, error = step, e
            break
    assert failed_at is not None and failed_at > 1, "the disk never filled up"
    assert "ENOSPC" in str(error), error
    assert_named_error(error, root)  # names the object that could not be written
    assert isinstance(error.__cause__, OSError)
    job.close()
    committed = committed_steps(open_backend(root))
    # Out of space before COMMITTED: the step does not exist. (Out of space on the manifest
    # update after COMMITTED: the step exists and the next start lists it.)
    assert committed[-1] in (failed_at - 1, failed_at)
    if committed[-1] == failed_at:
        assert "manifest.json" in str(error)
    check_run(root, refs, expect_last=committed[-1])
