"""Exactness under torchrun: a run SIGKILLed after a save and resumed equals an uninterrupted
run bit for bit (per-step losses, final parameters, optimizer state), with DDP and FSDP2 —
and a checkpoint resumes at another world size with identical state."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from exactness import compare, torchrun, torchrun_once_more_on_abort
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager

STEPS = 24
COMMON = ["--steps", str(STEPS), "--save-every", "4", "--keep-last", "2"]


def _run(script: str, nproc: int, args: list[str], log: Path) -> int:
    return torchrun(script, nproc, [*COMMON, *args], log=log, timeout=240)


def _resume(script: str, nproc: int, args: list[str], log: Path) -> int:
    return torchrun_once_more_on_abort(script, nproc, [*COMMON, *args], log=log, timeout=240)


def _uninterrupted(script: str, tmp: Path) -> None:
    outputs = (tmp / "a", tmp / "a.jsonl", tmp / "a.st")
    rc = torchrun_once_more_on_abort(
        script,
        2,
        [*COMMON, "--ckpt", str(tmp / "a"), "--losses-out", str(tmp / "a.jsonl"), "--final-out", str(tmp / "a.st")],
        log=tmp / "log",
        timeout=240,
        discard=outputs,
    )
    assert rc == 0, (tmp / "log").read_text()[-3000:]


@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp.py"])
def test_killed_and_resumed_run_is_bit_identical(script: str, tmp_path: Path) -> None:
    _uninterrupted(script, tmp_path)
    crash = random.Random().randrange(5, STEPS - 3)
    rc = _run(
        script,
        2,
        ["--ckpt", str(tmp_path / "b"), "--crash-at-step", str(crash), "--losses-out", str(tmp_path / "b.jsonl")],
        tmp_path / "log",
    )
    assert rc != 0, "the job was SIGKILLed and must not exit cleanly"
    last_before = max(c.step for c in CheckpointManager(str(tmp_path / "b"), read_only=True).checkpoints())
    assert last_before <= crash
    rc = _resume(
        script,
        2,
        [
            "--ckpt",
            str(tmp_path / "b"),
            "--resume",
            "auto",
            "--losses-out",
            str(tmp_path / "b.jsonl"),
            "--final-out",
            str(tmp_path / "b.st"),
        ],
        tmp_path / "log",
    )
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    result = compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "a.st", tmp_path / "b.st")
    assert result.steps_compared == STEPS
    assert result.tensors_compared > 4  # parameters and AdamW exp_avg/exp_avg_sq/step
    assert result.identical, f"crash at {crash}, resumed from {last_before}: {result.first_difference}"


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_at_another_world_size(nproc: int, tmp_path: Path) -> None:
    _uninterrupted("train_fsdp.py", tmp_path)
    log = tmp_path / "log"
    # Resume the finished 2-rank run at `nproc` ranks, dump the state right after loading, and
    # train 4 more steps.
    rc = torchrun(
        "train_fsdp.py",
        nproc,
        [
            "--steps",
            str(STEPS + 4),
            "--save-every",
            "4",
            "--ckpt",
            str(tmp_path / "a"),
            "--loaded-out",
            str(tmp_path / "loaded.st"),
        ],
        log=log,
        timeout=300,
    )
    assert rc == 0, log.read_text()[-3000:]
    saved, loaded = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "loaded.st"))
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert "world size changed: the checkpoint was saved by 2 ranks" in log.read_text()
    if nproc == 4:
        assert "reseeded from (step=" in log.read_text()
    steps = [c.step for c in CheckpointManager(str(tmp_path / "a"), read_only=True).checkpoints()]
    assert steps[-1] == STEPS + 3, steps
