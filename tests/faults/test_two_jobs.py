"""Two jobs write the same run. A second manager on a run root held by a live job fails at once
with RunLocked (naming the root, the lock and its owner) and writes nothing; the first job's
checkpoints are all intact. Below the lock, two writers racing for the same step (no manager,
e.g. the lock deleted by hand) never produce a mixed step: one commits, the other gets
StepAlreadyExists, and the step holds exactly the winner's state."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from _fault_lib import QUIET, assert_named_error, check_run, start_job, wait_for
from support.faulty_backend import FaultyBackend, Rule

import dist_ckpt
from dist_ckpt.api import save_to
from dist_ckpt.errors import RunLocked, StepAlreadyExists
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = QUIET


def _files(root: Path) -> dict[str, int]:
    """The committed step 1's files (the first job may go on writing others meanwhile)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "step_000000001").rglob("*") if p.is_file()}


def test_second_job_on_the_same_run_fails_with_run_locked(tmp_path: Path) -> None:
    root = tmp_path / "run"
    job = start_job(tmp_path, str(root), [1, 2, 3], extra=["--hold", "1.0"], name="first")
    try:
        first_pid = job.pid_of(0)
        wait_for(lambda: "HOLDING" in job.output(), 120, "the first job to save step 1", job)
        before = _files(root)
        with pytest.raises(RunLocked) as err:
            dist_ckpt.CheckpointManager(str(root), best={"loss": "min"})
        assert_named_error(err.value, str(root), "LOCK", f":{first_pid}:")
        # shard, rank index, metadata.json, COMMITTED: the second manager touched none of them
        assert sorted(before) == sorted(
            f"step_000000001/{n}"
            for n in ("rank_00000.safetensors", "index_00000.safetensors", "metadata.json", "COMMITTED")
        )
        assert _files(root) == before
        rc = job.wait(120)
    finally:
        job.kill()
    assert rc == 0, job.output()
    check_run(str(root), tmp_path / "refs", expect_last=3)  # every step entirely the first job's


def _state(value: float) -> dict:
    return {"w": torch.full((64, 64), value), "b": torch.full((64,), value), "meta": {"who": value}}


@pytest.mark.parametrize("attempt", range(2))
def test_two_writers_racing_for_one_step_never_mix(tmp_path: Path, attempt: int) -> None:
    root = str(tmp_path / "run")
    barrier = threading.Barrier(2, timeout=30)
    outcomes: dict[float, BaseException | None] = {}

    def writer(value: float) -> None:
        # both finish their shards, then race through metadata.json / COMMITTED / publish
        backend = FaultyBackend(
            open_backend(root),
            [Rule("create_if_absent", "*/metadata.json", "call", hook=lambda op, key: barrier.wait())],
        )
        try:
            save_to(backend, "step_000000007", _state(value), commit_info={"step": 7})
            outcomes[value] = None
        except BaseException as e:  # noqa: BLE001
            outcomes[value] = e

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [v for v, e in outcomes.items() if e is None]
    losers = {v: e for v, e in outcomes.items() if e is not None}
    assert len(winners) == 1, outcomes
    (loser_error,) = losers.values()
    assert isinstance(loser_error, StepAlreadyExists), repr(loser_error)
    assert_named_error(loser_error, "step_000000007")
    loaded = {"w": torch.zeros(64, 64), "b": torch.zeros(64), "meta": {"who": None}}
    dist_ckpt.load(loaded, f"{root}/step_000000007")
    w = winners[0]
    assert loaded["meta"]["who"] == w and bool((loaded["w"] == w).all()) and bool((loaded["b"] == w).all())
    report = verify_run(open_backend(root))
    assert all(c.ok for c in report.checkpoints), report.to_json()
