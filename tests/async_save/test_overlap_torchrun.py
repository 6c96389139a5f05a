"""async_save="overlap" under torchrun: a 2-rank DDP (and FSDP2) job (Dropout: RNG drawn in forward) saving
with overlapped staging, SIGKILLed mid-run and resumed, equals an uninterrupted run bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from exactness import compare, torchrun, torchrun_once_more_on_abort

from dist_ckpt import CheckpointManager

STEPS = 16
COMMON = ["--steps", str(STEPS), "--save-every", "3", "--keep-last", "2", "--overlap"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp.py"])
def test_killed_and_resumed_overlap_run_is_bit_identical(script: str, tmp_path: Path) -> None:
    a = [
        *COMMON,
        "--ckpt",
        str(tmp_path / "a"),
        "--losses-out",
        str(tmp_path / "a.jsonl"),
        "--final-out",
        str(tmp_path / "a.st"),
    ]
    rc = torchrun_once_more_on_abort(
        script,
        2,
        a,
        log=tmp_path / "log",
        timeout=240,
        discard=(tmp_path / "a", tmp_path / "a.jsonl", tmp_path / "a.st"),
    )
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    crash = random.Random().randrange(5, STEPS - 3)
    rc = torchrun(
        script,
        2,
        [
            *COMMON,
            "--ckpt",
            str(tmp_path / "b"),
            "--crash-at-step",
            str(crash),
            "--losses-out",
            str(tmp_path / "b.jsonl"),
        ],
        log=tmp_path / "log",
        timeout=240,
    )
    assert rc != 0, "the job was SIGKILLed and must not exit cleanly"
    last_before = max(c.step for c in CheckpointManager(str(tmp_path / "b"), read_only=True).checkpoints())
    rc = torchrun_once_more_on_abort(
        script,
        2,
        [
            *COMMON,
            "--ckpt",
            str(tmp_path / "b"),
            "--resume",
            "auto",
            "--losses-out",
            str(tmp_path / "b.jsonl"),
            "--final-out",
            str(tmp_path / "b.st"),
        ],
        log=tmp_path / "log",
        timeout=240,
    )
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    result = compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "a.st", tmp_path / "b.st")
    assert result.steps_compared == STEPS
    assert result.tensors_compared > 4
    assert result.identical, f"crash at {crash}, resumed from {last_before}: {result.first_difference}"
