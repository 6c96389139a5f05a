"""Per-rank bodies of tests/distributed/test_compact_plan_ranks.py: an FSDP2 model + AdamW saved
twice by the same ranks, once with compact plans (dist_ckpt's default) and once with DCP's
per-chunk plans, reporting what the coordinator was sent and what each rank wrote."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _meta16_workers import make, train
from _reshard_workers import STEPS, full_state, sync_buffers
from torch.distributed.checkpoint.state_dict import get_state_dict

from dist_ckpt.compact_plan import agreement
from dist_ckpt.planner import JsonSavePlanner
from dist_ckpt.storage import DistCkptWriter
from storage_backends.local import LocalBackend


class PerChunkPlanner(JsonSavePlanner):
    """DCP's per-chunk plans: every item of every rank sent to the coordinator (no split rule,
    no agreement on replicated items)."""

    def _splits(self) -> dict[str, Any]:
        return {}


def save_both(rank: int, world_size: int, root: str, ref: str) -> dict[str, Any]:
    model, optim = make(world_size, seed=0)
    train(model, optim, rank)
    sync_buffers(model)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "meta": {"step": STEPS, "world_size": world_size}}
    out: dict[str, Any] = {}
    for name, planner in (("compact", JsonSavePlanner(agree=agreement())), ("per_chunk", PerChunkPlanner())):
        writer = DistCkptWriter(LocalBackend(root), f"{name}/step_000000003")
        dcp.save(state, storage_writer=writer, planner=planner)
        out[name] = {
            "coordinator_items": planner.coordinator_items,
            "ruled": sorted(planner.ruled_fqns),
            "written": sorted(str((i.index.fqn, tuple(i.index.offset or ()))) for i in planner.plan.items),
        }
    full_m, full_o = full_state(model, optim)
    if rank == 0:
        torch.save({"model": full_m, "optim": full_o}, ref)
    dist.barrier()
    return out


def save_rank_own_keys(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    """Plain tensors: one every rank holds, one only this rank holds (the ranks' unruled items
    differ, so each rank sends its own, as DCP's plans do)."""
    import dist_ckpt

    state = {"shared": torch.arange(6.0), f"only_rank{rank}": torch.full((3,), float(rank))}
    dist_ckpt.save(state, ckpt)
    return {}
