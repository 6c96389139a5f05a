"""Per-rank bodies of tests/distributed/test_metadata_16_ranks.py: an FSDP2 model like
_reshard_workers' (uneven rows, a layer with fewer rows than ranks, the first weight sharded by
columns — 16 of them, as FSDP2 needs an even split on dim 1) saved and restored at 16 and 4
ranks, and which rank index files each restoring rank read (format 2: only those of the files
holding its chunks)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _reshard_workers import LR, STEPS, _compare, full_state, sync_buffers, wrap
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import dist_ckpt
from dist_ckpt.planner import JsonLoadPlanner
from dist_ckpt.storage_reader import DistCkptReader
from storage_backends.local import LocalBackend

IN = 16


def make(world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)
    )
    model = wrap("fsdp", model, world_size)
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def train(model: nn.Module, optim: torch.optim.Optimizer, rank: int, steps: int = STEPS) -> None:
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        loss = model(torch.randn(8, IN, generator=gen)).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def save_job(rank: int, world_size: int, ckpt: str, ref: str) -> dict[str, Any]:
    model, optim = make(world_size, seed=0)
    train(model, optim, rank)
    sync_buffers(model)
    msd, osd = get_state_dict(model, optim)
    dist_ckpt.save({"model": msd, "optim": osd, "meta": {"step": STEPS, "world_size": world_size}}, ckpt)
    full_m, full_o = full_state(model, optim)
    if rank == 0:
        torch.save({"model": full_m, "optim": full_o}, ref)
    dist.barrier()
    with open(os.path.join(ckpt, "metadata.json")) as f:
        doc = json.load(f)
    return {"files": sorted(doc["files"]), "world_size": doc["world_size"]}


def load_and_report(rank: int, world_size: int, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each ``(ckpt, ref)``: load into a differently initialised model at this world size,
    compare the full state with the reference bit for bit (rank 0), and report the rank index
    files this rank read."""
    out = []
    for ckpt, ref in jobs:
        model, optim = make(world_size, seed=12345)
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "meta": {"step": -1, "world_size": None}}
        root, name = ckpt.rstrip("/").rsplit("/", 1)
        reader = DistCkptReader(LocalBackend(root), name)
        dcp.load(state, storage_reader=reader, planner=JsonLoadPlanner())
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        full_m, full_o = full_state(model, optim)
        if rank == 0:
            expected = torch.load(ref, weights_only=True)
            assert len(expected["model"]) >= 12 and expected["optim"]["state"], "reference is empty"
            _compare(full_m, expected["model"], f"{ckpt}: model")
            _compare(full_o, expected["optim"], f"{ckpt}: optim")
        assert reader.checkpoint is not None and reader.checkpoint.indexes is not None
        out.append({"indexes_read": reader.checkpoint.indexes.loaded(), "meta": state["meta"]})
        dist.barrier()
    return out
