"""The job process dies (``os._exit``: no cleanup, no finally) at each point of the commit
protocol. Afterwards the last committed checkpoint loads bit-identical, nothing half-written is
ever visible, and the next manager start cleans up and reconciles the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from _fault_lib import QUIET, check_run, committed_steps, injected, restore_into_fresh, run_job

from storage_backends import open_backend

pytestmark = QUIET


def _staging_dirs(root: Path, step: int) -> list[Path]:
    return sorted(root.glob(f"step_{step:09d}.tmp-*"))


def _manifest_steps(root: Path) -> list[int]:
    return [e["step"] for e in json.loads((root / "manifest.json").read_text())["checkpoints"]]


def test_crash_after_all_shards_before_committed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    rc, out = run_job(
        tmp_path,
        str(root),
        [1, 2, 3],
        faults=[{"op": "create_if_absent", "key": "step_000000003*/COMMITTED", "action": "exit"}],
    )
    assert rc == 137, out
    assert [f["op"] for f in injected(tmp_path)] == ["create_if_absent"]
    # the crash really came after every shard and metadata.json: they sit in the staging folder
    (staging,) = _staging_dirs(root, 3)
    assert {p.name for p in staging.iterdir()} == {"rank_00000.safetensors", "index_00000.safetensors", "metadata.json"}
    assert committed_steps(open_backend(str(root))) == [1, 2]
    info, _ = restore_into_fresh(str(root), None)  # a reader before any cleanup: step 3 invisible
    assert info.step == 2
    check_run(str(root), tmp_path / "refs", expect_last=2)
    assert not _staging_dirs(root, 3)


def test_crash_after_committed_marker_before_publish(tmp_path: Path) -> None:
    """Local/NFS: COMMITTED is written inside the staging folder; the crash comes before the
    rename that publishes it. The staged step stays invisible and is removed."""
    root = tmp_path / "run"
    rc, out = run_job(
        tmp_path,
        str(root),
        [1, 2, 3],
        faults=[{"op": "create_if_absent", "key": "step_000000003*/COMMITTED", "action": "exit", "when": "after"}],
    )
    assert rc == 137, out
    (staging,) = _staging_dirs(root, 3)
    assert (staging / "COMMITTED").exists() and not (root / "step_000000003").exists()
    info, _ = restore_into_fresh(str(root), None)
    assert info.step == 2
    check_run(str(root), tmp_path / "refs", expect_last=2)


def test_crash_after_committed_before_manifest_update(tmp_path: Path) -> None:
    root = tmp_path / "run"
    rc, out = run_job(
        tmp_path,
        str(root),
        [1, 2, 3],
        arm_at=3,
        faults=[{"op": "compare_and_swap", "key": "manifest.json", "action": "exit"}],
    )
    assert rc == 137, out
    assert committed_steps(open_backend(str(root))) == [1, 2, 3]  # step 3 is committed...
    assert _manifest_steps(root) == [1, 2]  # ...but the manifest never heard of it
    assert not (tmp_path / "refs" / "step_3.returned").exists()
    # The next manager start reconciles: step 3 is the last checkpoint, bit-identical.
    check_run(str(root), tmp_path / "refs", expect_last=3)
    assert _manifest_steps(root) == [1, 2, 3]


def test_crash_during_retention_deletes(tmp_path: Path) -> None:
    """keep_last=1: the crash comes after the manifest dropped step 2 and its COMMITTED marker
    was deleted, before its files were: a step without COMMITTED, invisible, removed by gc."""
    root = tmp_path / "run"
    rc, out = run_job(
        tmp_path,
        str(root),
        [1, 2, 3],
        extra=["--keep-last", "1"],
        faults=[{"op": "delete_prefix", "key": "step_000000002/", "action": "exit"}],
    )
    assert rc == 137, out
    assert (root / "step_000000002").exists() and not (root / "step_000000002" / "COMMITTED").exists()
    check = check_run(str(root), tmp_path / "refs", expect_last=3, keep_last=1)
    assert check.committed[-1] == 3 and 2 not in check.committed  # (step 1 may stay: best:loss)
    assert not (root / "step_000000002").exists()
