"""Rank 0 does not wait for its decision broadcast (decision.py): it posts the send and goes
on, while the other ranks still wait for the decision before acting on it. Shown on 2 ranks
with rank 1 held back: rank 0's save() calls — not due, due and async, an error, a decision
too large for the fixed buffer — return before rank 1 reaches its own, and every rank ends with
the same decisions, progress and checkpoints (a rank-divergent decision stays impossible)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from support.dist import run_ranks

HELD_BACK_S = 15.0  # rank 1 waits this long at most for rank 0 to get past its save() alone


def _held_back(rank: int, world_size: int, root: str, gate: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dist_ckpt import CheckpointManager
    from dist_ckpt.errors import StepAlreadyExists

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    mgr = CheckpointManager(root, async_save=True, save_every_n_steps=3, best={"loss": "min"}, keep_last=10)
    state = mgr.track(model=model)
    many = {f"m{i:04d}": float(i) for i in range(200)}  # > 1 KiB of JSON: the general path
    # (step, metrics, force, whether rank 0 returns on its own: the general path — an error, an
    # oversized decision — is a blocking broadcast_object_list, as before)
    calls: list[tuple[int, dict[str, Any], bool, bool]] = [
        (1, {"loss": 5.0 + rank}, False, True),  # due: the first value of a tracked metric
        (3, {"loss": 4.0 + 10 * rank}, False, True),  # due (interval), async
        (4, {"loss": 9.0}, False, True),  # not due
        (5, {"loss": 1.0 + rank}, False, True),  # rank 0's loss improved: due; rank 1's own did not
        (6, {"loss": 7.0, **many}, False, False),  # due, the oversized decision
        (3, {}, True, False),  # committed already: rank 0 refuses, on every rank
        (9, {"loss": 3.0 - rank}, False, True),  # due
        (10, {"loss": 8.0}, False, True),  # not due: the last send, settled by close()
    ]
    out: dict[str, Any] = {"saved": [], "returned_alone": []}
    for i, (step, metrics, force, alone) in enumerate(calls):
        with torch.no_grad():
            model.weight.add_(1.0)
        out.setdefault("weight_sums", {})[step] = float(model.weight.detach().sum())
        marker = Path(gate) / f"rank0-past-{i}"
        if rank == 1 and alone:  # held back until rank 0 has returned from this call on its own
            deadline = time.monotonic() + HELD_BACK_S
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            out["returned_alone"].append(marker.exists())
        try:
            out["saved"].append(mgr.save(step, state, metrics=metrics, force=force))
        except StepAlreadyExists:
            out["saved"].append("StepAlreadyExists")
        if rank == 0:
            marker.touch()
        out.setdefault("progress", []).append(
            (mgr._progress.step, dict(mgr.best), dict(mgr.epochs_without_improvement), len(mgr._progress.metrics))
        )
    mgr.close()
    dist.barrier()
    with CheckpointManager(root) as reader:
        out["committed"] = [c.step for c in reader.checkpoints()]
        restored = torch.nn.Linear(64, 64)
        info = reader.restore(reader.track(model=restored))
        out["restored_step"] = info.step
        out["restored_weight_sum"] = float(restored.weight.detach().sum())
    return out


def test_rank0_never_waits_for_the_decision_send_and_ranks_agree(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    r0, r1 = run_ranks(_held_back, 2, str(tmp_path / "run"), str(gate), timeout=240)
    assert r1["returned_alone"] == [True] * 6, f"rank 0 waited for rank 1 in save(): {r1['returned_alone']}"
    assert r0["saved"] == r1["saved"] == [True, True, False, True, True, "StepAlreadyExists", True, False]
    assert r0["progress"] == r1["progress"]  # rank 0's metrics, best values and patience everywhere
    assert r0["progress"][-1][1] == {"loss": 1.0}
    assert r0["committed"] == r1["committed"] == [1, 3, 5, 6, 9]
    assert r0["restored_step"] == r1["restored_step"] == 9
    for out in (r0, r1):  # the state each rank passed at step 9, bit for bit (sums of exact adds)
        assert out["restored_weight_sum"] == out["weight_sums"][9]
