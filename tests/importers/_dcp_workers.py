"""Per-rank bodies of test_import_dcp.py (run through support.dist.run_ranks).

``write_dcp``: an FSDP2 model (uneven shards, one rank's shard of the last layer empty) trained
a few AdamW steps, saved by torch's own ``dcp.save`` with ``FileSystemWriter`` — the layout
``get_state_dict`` gives, ``{"model": ..., "optim": ...}`` — and the full state rank 0 gathered,
returned as the reference. ``restore_fsdp``: a differently initialised FSDP2 model restored
from the imported run with ``CheckpointManager.restore``, its full state returned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

STEPS = 3


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 7), nn.ReLU(), nn.Linear(7, 1))


def shard(model: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, 12, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state, full tensors (every rank takes part; rank 0's copy is used)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=options)
    return {"model": {k: v.clone() for k, v in msd.items()}, "optim": osd}


def write_dcp(rank: int, world_size: int, folder: str) -> dict[str, Any] | None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    model = shard(build_model(0), world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=FileSystemWriter(folder))
    ref = full_state(model, opt)
    dist.barrier()
    return ref if rank == 0 else None


def restore_fsdp(rank: int, world_size: int, run: str) -> dict[str, Any] | None:
    from dist_ckpt import CheckpointManager

    model = shard(build_model(1), world_size)  # another init: everything must come from the checkpoint
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    mgr = CheckpointManager(run, read_only=True)
    info = mgr.restore(mgr.track(model=model, optim=opt))
    assert info is not None
    mgr.close()
    got = full_state(model, opt)
    return {"step": info.step, **got} if rank == 0 else None
