"""Per-rank bodies of tests/distributed/test_reshard.py (run through support.dist.run_ranks).

A small model (Linear layers with deliberately uneven sizes — one with fewer rows than ranks,
so some FSDP shards are empty, and the first weight sharded by columns — plus LayerNorm and
BatchNorm buffers) is wrapped in DDP or FSDP2, trained a few AdamW steps, and saved with ``dist_ckpt.save`` through
``get_state_dict``. Loading builds the model with a *different* init, loads through
``set_state_dict`` and compares the full (gathered) model and optimizer state with a reference
the saving job wrote on rank 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import dist_ckpt

STEPS = 3
LR = 1e-2


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 20),
        nn.LayerNorm(20),
        nn.ReLU(),
        nn.Linear(20, 7),  # 7 rows over 4 ranks: 2, 2, 2, 1
        nn.BatchNorm1d(7),  # buffers: running_mean/var (plain tensors), num_batches_tracked (0-d int64)
        nn.Linear(7, 3),  # 3 rows over 4 ranks: one rank holds an empty shard
    )


def wrap(kind: str, model: nn.Module, world_size: int) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        mesh = init_device_mesh("cpu", (world_size,))
        first = model[0].weight

        def placement(param: nn.Parameter) -> Shard | None:
            # The first weight is sharded by columns: resharding it reads strided boxes.
            return Shard(1) if param is first else None

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(kind)


def make(kind: str, world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = wrap(kind, build_model(seed), world_size)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    return model, optim


def train(model: nn.Module, optim: torch.optim.Optimizer, rank: int, steps: int = STEPS) -> None:
    gen = torch.Generator().manual_seed(1000 + rank)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen)
        loss = model(x).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model/optimizer state as plain CPU tensors on rank 0 ({} on other ranks)."""
    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sync_buffers(model: nn.Module) -> None:
    """Make every rank hold rank 0's buffers.

    Neither DDP (which broadcasts buffers at the *start* of a forward) nor FSDP2 keeps
    BatchNorm running statistics identical across ranks after the last forward: each rank
    holds the stats of its own last batch. DCP then saves a replicated tensor from whichever
    rank its de-duplication picks, so the "true" value of such a buffer is ambiguous. Syncing
    them before the save makes the reference well defined."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)


def save_job(rank: int, world_size: int, jobs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """For each ``(kind, ckpt, ref)``: train, save the sharded state with dist_ckpt, and write
    the full reference state (torch.save of plain tensors) on rank 0."""
    out = []
    for kind, ckpt, ref in jobs:
        model, optim = make(kind, world_size, seed=0)
        train(model, optim, rank)
        sync_buffers(model)
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "meta": {"step": STEPS, "saved_by": kind, "world_size": world_size}}
        dist_ckpt.save(state, ckpt)
        full_m, full_o = full_state(model, optim)
        if rank == 0:
            torch.save({"model": full_m, "optim": full_o}, ref)
        dist.barrier()
        with open(os.path.join(ckpt, "metadata.json")) as f:
            doc = json.load(f)
        out.append({"files": sorted(doc["files"]), "world_size": doc["world_size"]})
    return out


def _compare(found: Any, expected: Any, path: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor), f"{path}: expected a tensor, found {type(found).__name__}"
        assert found.dtype == expected.dtype, f"{path}: dtype {found.dtype} != {expected.dtype}"
        assert found.shape == expected.shape, f"{path}: shape {list(found.shape)} != {list(expected.shape)}"
        assert torch.equal(found, expected), (
            f"{path}: values differ (max abs diff {(found.double() - expected.double()).abs().max()})"
        )
    elif isinstance(expected, dict):
        assert isinstance(found, dict), f"{path}: expected a dict, found {type(found).__name__}"
        assert sorted(map(str, found)) == sorted(map(str, expected)), (
            f"{path}: keys {sorted(found)} != {sorted(expected)}"
        )
        for k in expected:
            _compare(found[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(found) == len(expected), f"{path}: length {len(found)} != {len(expected)}"
        for i, (f, e) in enumerate(zip(found, expected)):
            _compare(f, e, f"{path}[{i}]")
    else:
        assert found == expected, f"{path}: {found!r} != {expected!r}"


def load_job(rank: int, world_size: int, jobs: list[tuple[str, str, str]]) -> list[str]:
    """For each ``(kind, ckpt, ref)``: build a differently initialised model and optimizer,
    load the checkpoint into them, and compare the full state with the reference (rank 0)."""
    done = []
    for kind, ckpt, ref in jobs:
        model, optim = make(kind, world_size, seed=12345)
        msd, osd = get_state_dict(model, optim)  # initialises the optimizer state (zeros)
        state = {"model": msd, "optim": osd, "meta": {"step": -1, "saved_by": None, "world_size": None}}
        dist_ckpt.load(state, ckpt)
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert state["meta"]["step"] == STEPS and state["meta"]["saved_by"] in ("ddp", "fsdp"), state["meta"]

        full_m, full_o = full_state(model, optim)
        if rank == 0:
            expected = torch.load(ref, weights_only=True)
            assert len(expected["model"]) >= 12 and expected["optim"]["state"], "reference is empty"
            _compare(full_m, expected["model"], f"{kind}<-{ckpt}: model")
            _compare(full_o, expected["optim"], f"{kind}<-{ckpt}: optim")
        # Training continues identically on every world size: one more step must not fail
        # and must keep the optimizer step count consistent.
        train(model, optim, rank, steps=1)
        _, osd_after = get_state_dict(model, optim)
        steps = {float(s["step"]) for s in osd_after["state"].values()}
        assert steps == {STEPS + 1.0}, steps
        done.append(f"{kind}<-{os.path.basename(ckpt)}")
        dist.barrier()
    return done
