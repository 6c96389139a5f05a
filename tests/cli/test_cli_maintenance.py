"""`dist-ckpt prune` and `gc` never remove the newest committed checkpoint or a pointed-to one."""

from __future__ import annotations

import json
from pathlib import Path

from cli_support import Run, as_json, assert_one_line_error, cli, cli_in

from dist_ckpt import CheckpointManager
from dist_ckpt.verify import verify


def _committed(root: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in root.glob("step_*/COMMITTED"))


def test_prune_keeps_newest_and_pointed_to(run_copy: Run):
    root = run_copy.root
    assert _committed(root) == [2, 5, 7, 8]  # best:acc=2, best:loss=5, last=8
    dry = cli_in("prune", root, "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert as_json(dry)["would_delete"] == [7] and as_json(dry)["deleted"] == []
    assert _committed(root) == [2, 5, 7, 8] and (root / "step_000000007").exists()

    real = cli("prune", root, "--keep-last", "1", check_rc=0)
    assert f"deleted {root}/step_000000007" in real.stdout
    assert "kept 3 checkpoints: 2 (best:acc), 5 (best:loss), 8 (last)" in real.stdout
    assert _committed(root) == [2, 5, 8] and not (root / "step_000000007").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 5, 8]
    assert manifest["pointers"] == {"best:acc": 2, "best:loss": 5, "last": 8}
    assert verify(str(root), quick=True).ok  # manifest consistent with the COMMITTED markers

    again = cli_in("prune", root, "--keep-last", "1", "--json")
    assert as_json(again)["deleted"] == [] and _committed(root) == [2, 5, 8]


def test_gc_removes_leftovers_only_and_respects_a_live_job(run_copy: Run):
    root = run_copy.root
    mgr = CheckpointManager(str(root), best={"loss": "min", "acc": "max"})  # holds the run's writer lock
    leftovers = [
        root / "step_000000009.tmp-0123456789ab" / "rank_00000.safetensors",
        root / "step_000000010" / "metadata.json",
        root / "step_000000008" / "rank_00001.safetensors.part-deadbeef",
    ]
    for p in leftovers:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    try:
        locked = cli("gc", root)  # a subprocess: another process's lock
        dry = cli_in("gc", root, "--dry-run", "--json")
    finally:
        mgr.close()
    assert "being written by another job" in assert_one_line_error(locked, 6)
    doc = as_json(dry)
    assert doc["temp_dirs"] == ["step_000000009.tmp-0123456789ab"] and doc["uncommitted_steps"] == ["step_000000010"]
    assert doc["unfinished_uploads"] == ["step_000000008/rank_00001.safetensors.part-deadbeef"]
    assert all(p.exists() for p in leftovers)

    real = cli_in("gc", root)
    assert real.returncode == 0, real.stderr
    assert "removed temp folder" in real.stdout and "removed uncommitted step" in real.stdout
    assert not any(p.exists() for p in leftovers) and not (root / "step_000000010").exists()
    assert _committed(root) == [2, 5, 7, 8]
    assert verify(str(root)).ok
