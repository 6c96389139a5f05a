"""Per-rank body of the 2-rank FSDP2 checkpoint the CLI tests export (run via support.dist.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dist_ckpt import CheckpointManager

STEP = 2


def save_fsdp(rank: int, world_size: int, root: str, ref: str) -> int:
    """Train an FSDP2 model two steps, save step 2 (zstd) with the manager, and write the full
    (gathered) model state as safetensors on rank 0. Layer sizes are uneven over the ranks
    (7 rows over 2) and one is large enough to be stored compressed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    with CheckpointManager(root, compression="zstd", best={"loss": "min"}) as mgr:
        state = mgr.track(model=model, optimizer=opt)
        for step in range(1, STEP + 1):
            loss = model(torch.randn(4, 64, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.save(step, state, metrics={"loss": float(loss)})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, ref)
    dist.barrier()
    return STEP
