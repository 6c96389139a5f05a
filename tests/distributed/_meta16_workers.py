"""Per-rank bodies of tests/distributed/test_metadata_16_ranks.py: the FSDP2 model of
_reshard_workers saved and restored at 16 and 4 ranks, and which rank index files each
restoring rank read (format 2: only those of the files holding its chunks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _reshard_workers import _compare, full_state, make, save_job
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_ckpt.planner import JsonLoadPlanner
from dist_ckpt.storage_reader import DistCkptReader
from storage_backends.local import LocalBackend

__all__ = ["save_job", "load_and_report"]


def load_and_report(rank: int, world_size: int, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each ``(ckpt, ref)``: load the FSDP2 checkpoint into a differently initialised model
    at this world size, compare the full state with the reference bit for bit (rank 0), and
    report the rank index files this rank read."""
    out = []
    for ckpt, ref in jobs:
        model, optim = make("fsdp", world_size, seed=12345)
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "meta": {"step": -1, "saved_by": None, "world_size": None}}
        root, name = ckpt.rstrip("/").rsplit("/", 1)
        reader = DistCkptReader(LocalBackend(root), name)
        dcp.load(state, storage_reader=reader, planner=JsonLoadPlanner())
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        full_m, full_o = full_state(model, optim)
        if rank == 0:
            expected = torch.load(ref, weights_only=True)
            _compare(full_m, expected["model"], f"{ckpt}: model")
            _compare(full_o, expected["optim"], f"{ckpt}: optim")
        assert reader.checkpoint is not None and reader.checkpoint.indexes is not None
        out.append({"indexes_read": reader.checkpoint.indexes.loaded(), "meta": state["meta"]})
        dist.barrier()
    return out
