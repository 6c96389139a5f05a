"""Data order is training state: a user-style script (plain DataLoader, no generator=,
DistributedSampler + set_epoch, dropout, torch.rand in the step) SIGKILLed mid-epoch and
restarted with the same command continues the epoch bit-identically — per-step losses, batch
contents, worker seeds, the global RNG state at each step, final parameters — and at another
world size trains every sample of the interrupted epoch exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from dist_ckpt import CheckpointManager

JOB = Path(__file__).with_name("_loader_job.py")
SAMPLES, BATCH, EPOCHS = 36, 4, 3


def _job(nproc: int, args: list[str], log: Path, timeout: float = 240) -> int:
    """Run the job under torchrun with ``nproc`` ranks, or as a plain process (``nproc=0``)."""
    cmd = [sys.executable, str(JOB), *args]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode


def _records(prefix: Path, rank: int) -> dict[int, dict]:
    """Per step; a step the resumed run trained again overwrites the killed run's."""
    out: dict[int, dict] = {}
    for line in Path(f"{prefix}.rank_{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def _killed_and_resumed(tmp: Path, nproc: int, args: list[str], crash: int, resume_nproc: int | None = None) -> int:
    """Run until rank 0 SIGKILLs itself after step ``crash``, then the same command again
    (at ``resume_nproc`` ranks if given). Returns the step the resume started from."""
    log = tmp / "log"
    command = [
        "--ckpt",
        str(tmp / "b"),
        "--out",
        str(tmp / "b"),
        "--final-out",
        str(tmp / "b.st"),
        "--crash-at-step",
        str(crash),
        *args,
    ]
    rc = _job(nproc, command, log)
    assert rc != 0 and (tmp / "b.crashed").exists(), (
        f"the job was to be SIGKILLed at step {crash}:\n" + log.read_text()[-3000:]
    )
    resumed_from = max(c.step for c in CheckpointManager(str(tmp / "b"), read_only=True).checkpoints())
    rc = _job(resume_nproc if resume_nproc is not None else nproc, command, log)
    assert rc == 0, log.read_text()[-4000:]
    return resumed_from


VARIANTS = [
    pytest.param(2, ["--workers", "0"], 6, id="ddp-workers0"),
    pytest.param(2, ["--workers", "2"], 12, id="ddp-workers2"),  # 3 batches of epoch 2 done: worker 1 loads the next
    pytest.param(2, ["--workers", "2", "--persistent"], 12, id="ddp-persistent-workers2"),
    pytest.param(0, ["--shuffle"], 12, id="one-process-shuffle"),
    pytest.param(
        0,
        ["--shuffle", "--workers", "2", "--persistent"],
        8,
        id="one-process-shuffle-persistent-workers-saved-at-epoch-end",
    ),
    pytest.param(2, ["--loader", "stateful", "--workers", "0"], 6, id="stateful-ddp-workers0"),
    pytest.param(2, ["--loader", "stateful", "--workers", "2"], 12, id="stateful-ddp-workers2"),
]


@pytest.mark.parametrize(("nproc", "args", "crash"), VARIANTS)
def test_killed_mid_epoch_and_restarted_is_bit_identical(
    nproc: int, args: list[str], crash: int, tmp_path: Path
) -> None:
    rc = _job(
        nproc,
        ["--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "a"), "--final-out", str(tmp_path / "a.st"), *args],
        tmp_path / "log",
    )
    assert rc == 0, (tmp_path / "log").read_text()[-4000:]
    resumed_from = _killed_and_resumed(tmp_path, nproc, args, crash)
    assert resumed_from == crash  # saved every 2 steps; the resume starts right after the kill
    per_epoch = -(-SAMPLES // max(nproc, 1) // BATCH)
    at_epoch_end = (crash + 1) % per_epoch == 0
    assert at_epoch_end == ("epoch-end" in os.environ.get("PYTEST_CURRENT_TEST", "")), (
        "the crash step must fit the variant"
    )
    for rank in range(max(nproc, 1)):
        a, b = _records(tmp_path / "a", rank), _records(tmp_path / "b", rank)
        assert len(a) == EPOCHS * per_epoch
        assert a.keys() == b.keys()
        for step in sorted(a):
            assert a[step] == b[step], (
                f"rank {rank}, step {step} (resumed after step {resumed_from}): {a[step]} != {b[step]}"
            )
        if "--workers" in args and args[args.index("--workers") + 1] != "0":
            assert all(s >= 0 for rec in b.values() for s in rec["worker_seeds"])
    final_a, final_b = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "b.st"))
    assert final_a.keys() == final_b.keys() and len(final_a) == 4
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


def test_without_a_tracked_loader_restore_says_so_and_the_resume_differs(tmp_path: Path) -> None:
    """The reproduction of the issue: the same script without loader= resumes at another RNG
    state and from the start of the epoch, and restore() says why (once, naming loader=)."""
    args = ["--shuffle", "--no-track-loader"]
    rc = _job(0, ["--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "a"), *args], tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-4000:]
    (tmp_path / "log").write_text("")
    _killed_and_resumed(tmp_path, 0, args, 12)
    log = (tmp_path / "log").read_text()
    assert log.count("no data loader is tracked") == 1, log[-3000:]
    assert "mgr.track(..., loader=" in log
    a, b = _records(tmp_path / "a", 0), _records(tmp_path / "b", 0)
    assert a[13]["rng"] != b[13]["rng"] and a[13]["ids"] != b[13]["ids"]


def _epoch_ids(records: list[dict], epoch: int) -> list[int]:
    return [i for rec in records if rec["epoch"] == epoch for i in rec["ids"]]


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_another_world_size_trains_the_rest_of_the_epoch_once(new_world: int, tmp_path: Path) -> None:
    crash = 6  # epoch 1 is steps 5-9 at 2 ranks: the checkpoint holds 2 of its 5 batches per rank
    resumed_from = _killed_and_resumed(tmp_path, 2, ["--workers", "0"], crash, resume_nproc=new_world)
    assert resumed_from == crash
    before = [rec for r in range(2) for s, rec in sorted(_records(tmp_path / "b", r).items()) if s <= resumed_from]
    after = {
        r: [rec for s, rec in sorted(_records(tmp_path / "b", r).items()) if s > resumed_from] for r in range(new_world)
    }
    trained = _epoch_ids(before, 1) + [i for r in range(new_world) for i in _epoch_ids(after[r], 1)]
    assert Counter(trained) == Counter(range(SAMPLES)), "every sample of the interrupted epoch exactly once"
    assert len(_epoch_ids(before, 1)) == 2 * 2 * BATCH
    steps = {r: [rec["step"] for rec in after[r] if rec["epoch"] == 1] for r in range(new_world)}
    assert len({tuple(s) for s in steps.values()}) == 1, f"ranks must take the same steps: {steps}"
    # The rest of the epoch in the global order the 2-rank sampler defined.
    order = []
    for r in range(2):
        old = DistributedSampler(range(SAMPLES), num_replicas=2, rank=r, seed=3)
        old.set_epoch(1)
        order.append(list(old))
    global_order = [order[p % 2][p // 2] for p in range(SAMPLES)]
    resumed_in_order = [
        i for step in steps[0] for r in range(new_world) for rec in after[r] if rec["step"] == step for i in rec["ids"]
    ]
    assert sorted(resumed_in_order) == sorted(global_order[16:])
    # The next epoch follows the new world size.
    for r in range(new_world):
        sampler = DistributedSampler(range(SAMPLES), num_replicas=new_world, rank=r, seed=3)
        sampler.set_epoch(2)
        assert _epoch_ids(after[r], 2) == list(sampler), f"rank {r}, epoch 2"
