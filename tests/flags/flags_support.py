"""Helpers of the resume-flag tests: run the job script, read what it reported, compare a run
root's files before and after, read a checkpoint's model tensors offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
JOB = HERE / "_flags_job.py"
EXAMPLES = HERE.parent.parent / "examples"


@dataclass(frozen=True)
class JobResult:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None


def run_script(script: Path, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A real process, with this environment (so it imports the tree under test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def run_job(tmp: Path, *args: str, train_steps: int = 0) -> JobResult:
    report = tmp / f"report_{len(list(tmp.glob('report_*')))}.json"
    proc = run_script(JOB, [*args, "--train-steps", str(train_steps), "--report", str(report)])
    data = json.loads(report.read_text()) if report.exists() else None
    return JobResult(proc.returncode, proc.stdout, proc.stderr, data)


def ok(result: JobResult) -> dict[str, Any]:
    assert result.returncode == 0, f"job failed ({result.returncode}):\n{result.stderr}"
    assert result.report is not None
    return result.report


def snapshot(root: Path) -> dict[str, bytes] | None:
    """Every file below ``root`` with its content; None when ``root`` does not exist."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_params(uri: str | Path, model: str = "model") -> dict[str, list[Any]]:
    """The tracked model's parameters stored in a checkpoint, as the job reports them."""
    from dist_ckpt.checkpoint_view import CheckpointView

    view = CheckpointView.open(str(uri))
    prefix = model + "."
    return {k[len(prefix) :]: view.tensor(k).tolist() for k in view.tensors if k.startswith(prefix)}


def initial_params() -> dict[str, list[Any]]:
    """The job's parameters before any checkpoint is applied (seed 0)."""
    sys.path.insert(0, str(HERE))
    from _flags_job import build_model

    torch.manual_seed(0)
    return {k: v.tolist() for k, v in build_model().state_dict().items()}


def distinct_weights(seed: int) -> dict[str, torch.Tensor]:
    """Weights for the job's model that no training run produces."""
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}


def committed_steps(root: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in root.glob("step_*/COMMITTED"))


def make_run(root: Path, steps: int) -> None:
    """What the job writes when it trains ``steps`` steps from a fresh start (made in-process)."""
    sys.path.insert(0, str(HERE))
    from _flags_job import track, train_step

    from dist_ckpt import CheckpointManager

    with CheckpointManager(str(root), best={"score": "max"}, save_every_n_steps=1) as mgr:
        model, opt, counters, state = track(mgr)
        for step in range(steps):
            train_step(model, opt)
            counters["examples"] += 8
            mgr.save(step, state, metrics={"score": -abs(step - 3)})


def start_with(rank: int, world_size: int, root: str, resume: str | None, init_from: str | None) -> tuple[Any, str]:
    """``mgr.start`` with a namespace built in code (no parse-time check), on every rank:
    (the exit code, or None, and what it wrote to stderr)."""
    import argparse
    import contextlib
    import io

    sys.path.insert(0, str(HERE))
    from _flags_job import track

    from dist_ckpt import CheckpointManager

    args = argparse.Namespace(ckpt=root, resume=resume, init_from=init_from, list_checkpoints=False)
    mgr = CheckpointManager(root, best={"score": "max"}, save_every_n_steps=1)
    state = track(mgr)[3]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mgr.start(state, args)
    except SystemExit as e:
        return e.code, err.getvalue()
    mgr.close()
    return None, err.getvalue()
