"""Async saves on 2 spawned ranks (gloo): DDP with the background thread, FSDP2 (DTensor
shards) with the writer process. A failure of one rank's background write surfaces on both
ranks at the next call, the earlier checkpoint stays ``last`` and the failed step has no
``COMMITTED``; SIGTERM on one rank makes ``should_stop()`` True on both; in-place changes
after ``save()`` do not leak; buffers are reused; nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import _async_workers as workers
import pytest
from support.dist import run_ranks


@pytest.mark.parametrize(("kind", "mode"), [("ddp", "thread"), ("fsdp", "process")])
def test_two_ranks(kind: str, mode: str, tmp_path: Path) -> None:
    results = run_ranks(workers.failure_and_preemption, 2, str(tmp_path), kind, mode, timeout=150)
    for rank, out in enumerate(results):
        assert out["allocations"] == 1 and out["pointers"][0] == out["pointers"][1], (rank, "staging buffers reused")
        assert out["error"] is not None and "background save of step 3 failed" in out["error"], (rank, out["error"])
        assert "injected failure writing" in out["error"] and "rank_00001" in out["error"], out["error"]
        assert out["committed_after_failure"] == [1, 2], "no COMMITTED for the failed step"
        assert out["last_after_failure"] == [2]
        assert out["stop_before"] is False and out["stop_after"] is True, rank
        assert out["value_error"] and "background save of step 6 failed" in out["value_error"], (
            rank,
            out["value_error"],
        )
        assert out["committed_final"] == [1, 2, 5]
        assert out["restored"] == {1: True, 2: True, 5: True}, (rank, out["restored"])
        assert not out["writer_alive"] and out["children_left"] == [] and out["shm_left"] == [], (rank, out)
        assert out["handler_restored"], rank
    assert results[0]["error"] == results[1]["error"], "both ranks raise the same error"


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_staging_budget_exceeded_on_one_rank(mode: str, tmp_path: Path) -> None:
    results = run_ranks(workers.staging_budget, 2, str(tmp_path), mode, timeout=120)
    over, under = results
    assert over["committed_at_return"] == [True, True], "over the budget: save() returns after the commit"
    assert over["buffer"] == [False, False] and under["buffer"] == [True, True]
    assert over["restored"] and under["restored"]
    assert over["committed"] == under["committed"] == [1, 2]
