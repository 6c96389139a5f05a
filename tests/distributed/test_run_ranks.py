"""The multi-rank test helper itself (tests/support/dist.py): results, failures, hangs, env."""

from __future__ import annotations

import os
import textwrap
import time

import pytest
from support.dist import RanksFailed, run_ranks, run_torchrun


def _sum_ranks(rank: int, world_size: int, offset: int) -> dict:
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": int(t.item()), "env_rank": os.environ["RANK"]}


def _fail_on_one(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()
    return rank


def _hang_on_zero(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 0:
        time.sleep(600)
    dist.barrier()


def _env(rank: int, world_size: int) -> tuple:
    return os.environ.get("RUN_RANKS_TEST_VAR"), os.environ["MASTER_PORT"], os.environ["WORLD_SIZE"]


def _own_group(rank: int, world_size: int) -> int:
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo")  # env://, as a script under torchrun would
    try:
        return dist.get_rank()
    finally:
        dist.destroy_process_group()


def test_results_by_rank():
    out = run_ranks(_sum_ranks, 3, 10)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["sum"] == 33 for o in out)
    assert [o["env_rank"] for o in out] == ["0", "1", "2"]


def test_failing_rank_traceback_comes_first():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_fail_on_one, 3, grace=20)
    msg = str(info.value)
    assert "ValueError: boom on rank 1" in msg
    assert msg.index("--- rank 1 ---") < msg.index("--- rank 0 ---")
    assert "ValueError" in info.value.failures[1]


def test_hang_times_out_with_stacks():
    t0 = time.monotonic()
    with pytest.raises(RanksFailed, match=r"timed out after 5s") as info:
        run_ranks(_hang_on_zero, 2, timeout=5)
    assert time.monotonic() - t0 < 30
    assert "_hang_on_zero" in info.value.failures[0]  # where it was stuck


def test_environment_is_the_callers(monkeypatch):
    monkeypatch.setenv("RUN_RANKS_TEST_VAR", "yes")
    out = run_ranks(_env, 2)
    assert {o[0] for o in out} == {"yes"} and {o[2] for o in out} == {"2"}


def test_process_group_left_to_the_function():
    assert run_ranks(_own_group, 2, init_process_group=False) == [0, 1]


def test_torchrun(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent("""
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1)
        dist.all_reduce(t)
        print(f"rank {dist.get_rank()} sum {int(t.item())}", flush=True)
        dist.destroy_process_group()
    """)
    )
    out = run_torchrun(script, 2, timeout=120).stdout
    assert "rank 0 sum 2" in out and "rank 1 sum 2" in out
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit(3)\n")
    with pytest.raises(RanksFailed, match=r"exited with"):
        run_torchrun(bad, 1, timeout=120)
