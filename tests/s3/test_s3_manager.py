"""The manager on real S3 servers, unchanged: 2 ranks under torchrun save, are killed and
resume from the ``s3://`` URI in new jobs (also at another world size), bit-identical to an
uninterrupted run — on SeaweedFS and on moto's server; two jobs racing to commit one step:
exactly one wins and the checkpoint holds the winner's data."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from exactness import compare, torchrun
from safetensors.torch import load_file
from support.s3server import S3_IMPLEMENTATIONS

import dist_ckpt
from dist_ckpt import CheckpointManager, StepAlreadyExists

STEPS = 16
COMMON = ["--steps", str(STEPS), "--save-every", "4", "--compression", "zstd"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(per-step losses, final state) of the run never killed; where it checkpoints (a local
    folder, shared by every server the resume runs on) does not change what it computes."""
    out = tmp_path_factory.mktemp("uninterrupted")
    log = out / "log"
    assert (
        torchrun(
            "train_ddp.py",
            2,
            [
                *COMMON,
                "--ckpt",
                str(out / "run"),
                "--losses-out",
                str(out / "a.jsonl"),
                "--final-out",
                str(out / "a.st"),
            ],
            log=log,
        )
        == 0
    ), log.read_text()[-3000:]
    return out / "a.jsonl", out / "a.st"


@pytest.mark.parametrize("s3_server", S3_IMPLEMENTATIONS, indirect=True)
def test_kill_and_resume_from_s3_uri_also_at_another_world_size(
    s3_uri: str, tmp_path: Path, uninterrupted: tuple[Path, Path]
) -> None:
    log = tmp_path / "log"
    run = f"{s3_uri}/b"
    assert (
        torchrun(
            "train_ddp.py",
            2,
            [*COMMON, "--ckpt", run, "--crash-at-step", "10", "--losses-out", str(tmp_path / "b.jsonl")],
            log=log,
        )
        != 0
    )
    assert (
        torchrun(
            "train_ddp.py",
            2,
            [*COMMON, "--ckpt", run, "--losses-out", str(tmp_path / "b.jsonl"), "--final-out", str(tmp_path / "b.st")],
            log=log,
        )
        == 0
    ), log.read_text()[-3000:]
    result = compare(uninterrupted[0], tmp_path / "b.jsonl", uninterrupted[1], tmp_path / "b.st")
    assert result.identical and result.steps_compared == STEPS, result.first_difference

    # A new single-rank job resumes the 2-rank run from its s3:// URI: identical state.
    assert torchrun("train_ddp.py", 1, [*COMMON, "--ckpt", run, "--loaded-out", str(tmp_path / "one.st")], log=log) == 0
    saved, loaded = load_file(str(uninterrupted[1])), load_file(str(tmp_path / "one.st"))
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    listing = CheckpointManager(run, read_only=True).checkpoints()
    assert listing[-1].step == STEPS - 1 and listing[-1].codec == "zstd" and "last" in listing[-1].pointers


def _racer(
    uri: str, value: float, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue
) -> None:
    state = {"w": torch.full((256, 256), value), "who": value}
    barrier.wait()
    try:
        dist_ckpt.save(state, uri)
        results.put(("won", value))
    except StepAlreadyExists as e:
        results.put(("lost", str(e)))


@pytest.mark.parametrize("attempt", range(2))
def test_two_jobs_racing_to_commit_one_step(s3_uri: str, attempt: int) -> None:
    uri = f"{s3_uri}/step_000000007"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, float(v), barrier, results)) for v in (1, 2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [v for kind, v in outcomes if kind == "won"]
    assert len(winners) == 1, outcomes
    assert [kind for kind, _ in outcomes].count("lost") == 1
    loaded = {"w": torch.zeros(256, 256), "who": None}
    dist_ckpt.load(loaded, uri)
    assert loaded["who"] == winners[0] and torch.equal(loaded["w"], torch.full((256, 256), winners[0]))
