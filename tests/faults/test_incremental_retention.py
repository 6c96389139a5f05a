"""Incremental checkpoints: a crash at any delete of retention never leaves a committed
checkpoint missing a file it refers to.

A frozen base + adapter job (``_incremental_job.py``, ``keep_last=2``, ``incremental=True``)
resumes a run of steps 1-2 and saves 3 and 4; each commit drops the oldest step, whose base
file the kept steps still refer to. The process dies on the spot (``os._exit``: no cleanup, no
``finally``, like ``kill -9``) at the N-th delete of the storage, for every N until a job runs
through. After each death every committed checkpoint verifies clean (whole-file checksums of
its own *and referenced* files) and holds the exact model the job saved; a fresh job then
starts on the run (garbage collection at start), saves once more, and the run verifies again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.faulty_backend import FaultyBackend

from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

HERE = Path(__file__).resolve().parent
JOB = HERE / "_incremental_job.py"


KILLED = 137
DELETES = ("delete", "delete_prefix")


def _job(
    root: Path, refs: Path, steps: str, *, resume: bool, kill_at: int | None = None, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    refs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIST_CKPT_FAULTS", None)
    if kill_at is not None:
        rule = {"op": list(DELETES), "key": "step_*", "action": "exit", "nth": kill_at, "exit_code": KILLED}
        env.update(FaultyBackend.env([rule], log=str(log)))
    cmd = [
        sys.executable,
        str(JOB),
        "--root",
        str(root),
        "--refs",
        str(refs),
        "--steps",
        steps,
        *(["--resume"] if resume else []),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def _check_run(root: Path, refs: Path, what: str) -> list[int]:
    backend = open_backend(str(root))
    report = verify_run(backend)
    problems = [p.message for c in report.checkpoints for p in c.problems]
    # a kill between the manifest update and the first delete leaves the manifest stale (the
    # dropped step is still committed); the manager reconciles it at its next start
    problems += [p.message for p in report.problems if p.kind != "manifest"]
    assert not problems, f"{what}: {problems}"
    steps = []
    for ckpt in report.checkpoints:
        step = ckpt.step
        view = CheckpointView(backend, f"step_{step:09d}")
        expected = load_file(str(refs / f"step_{step}.safetensors"))
        for key, tensor in expected.items():
            assert torch.equal(view.tensor(f"model.{key}"), tensor), f"{what}: step {step} {key}"
        steps.append(step)
    assert steps, f"{what}: no committed checkpoint left"
    return steps


def _prepared(tmp_path: Path) -> tuple[Path, Path]:
    prep, refs = tmp_path / "prep", tmp_path / "refs"
    done = _job(prep, refs, "1,2", resume=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return prep, refs


def _kill_at(tmp_path: Path, prep: Path, refs: Path, n: int) -> str | None:
    """Kill at the n-th delete: the operation killed in; None when the job had fewer deletes
    and ran through."""
    root, log = tmp_path / f"run{n}", tmp_path / f"faults{n}.jsonl"
    shutil.copytree(prep, root)
    proc = _job(root, refs, "3,4", resume=True, kill_at=n, log=log)
    if proc.returncode == 0:
        assert not log.exists(), "a fault was logged, yet the job ran through"
        _check_run(root, refs, f"no kill (n={n})")
        return None
    assert proc.returncode == KILLED, f"n={n}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    fired = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(fired) == 1 and fired[0]["op"] in DELETES, fired
    _check_run(root, refs, f"killed at delete {n} ({fired[0]['op']} {fired[0]['key']})")
    # a fresh job starts on the run (gc of the half-deleted step), saves, retention runs again
    after = _job(root, refs, "5", resume=True)
    assert after.returncode == 0, f"n={n}: {after.stderr[-3000:]}"
    assert _check_run(root, refs, f"after restart (n={n})")[-1] == 5
    leftovers = [p for p in root.glob("step_*") if not (p / "COMMITTED").exists()]
    for folder in leftovers:  # only files committed checkpoints still refer to may remain
        # (or an empty directory: a kill after the last file's delete, before the folder's)
        assert {f.name for f in folder.iterdir()} <= {"rank_00000.safetensors"}, folder
    return f"{fired[0]['op']} {fired[0]['key']}"


@pytest.mark.parametrize("n", [2])
def test_kill_at_first_deletes_of_retention(tmp_path, n):
    """Fast: the second delete (COMMITTED of the dropped step is gone, its files are not)."""
    prep, refs = _prepared(tmp_path)
    assert _kill_at(tmp_path, prep, refs, n)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~12 kills, 2 jobs each
def test_kill_at_every_delete_of_retention(tmp_path):
    prep, refs = _prepared(tmp_path)
    killed = []
    for n in range(1, 60):
        op = _kill_at(tmp_path, prep, refs, n)
        if op is None:
            break
        killed.append(op)
        print(f"killed at delete {n} ({op}): committed checkpoints verified, restart verified", flush=True)
    # two retentions: step 1 (its base file referenced: COMMITTED, metadata.json, its index, one
    # by one), step 2 (nothing referenced: COMMITTED, then the folder), then none left
    assert killed[:3] == [
        "delete step_000000001/COMMITTED",
        "delete step_000000001/index_00000.safetensors",
        "delete step_000000001/metadata.json",
    ], killed
    assert killed[3:] == ["delete step_000000002/COMMITTED", "delete_prefix step_000000002/"], killed
