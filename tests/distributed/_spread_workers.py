"""Per-rank bodies of tests/distributed/test_ddp_spread_writes.py (support.dist.run_ranks).

The model of the reshard tests (Linear layers, LayerNorm, BatchNorm buffers) wrapped in DDP,
AdamW, each rank training on its own data: the BatchNorm running statistics differ between
ranks after the last forward (on purpose: the checkpoint must hold rank 0's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from _reshard_workers import make, train

from dist_ckpt import CheckpointManager


def local_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's parameters, buffers and optimizer state, cloned (by parameter name)."""
    out = {f"m.{k}": v.detach().clone() for k, v in model.module.state_dict().items()}
    names = {id(p): n for n, p in model.module.named_parameters()}
    for p, st in optim.state.items():
        out.update({f"o.{names[id(p)]}.{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def save_and_continue(rank: int, world_size: int, root: str, spread: bool) -> dict[str, Any]:
    """Train 3 steps, save (step 3), train 3 more; return rank 0's state at the save, every
    rank's buffers at the save, and the state after step 6."""
    model, optim = make("ddp", world_size, seed=0)
    mgr = CheckpointManager(root, ddp_spread_writes=spread)
    state = mgr.track(model=model, optimizer=optim)
    train(model, optim, rank, steps=3)
    at_save = local_state(model, optim)
    mgr.save(3, state, force=True)
    mgr.close()
    train(model, optim, rank, steps=3)
    buffers: list[Any] = [None] * world_size
    dist.all_gather_object(buffers, {k: v for k, v in at_save.items() if "running" in k})
    return {"at_save": at_save, "buffers_by_rank": buffers, "final": local_state(model, optim)}


def resume_and_continue(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A new job: restore step 3 into a differently initialised model, train 3 more steps
    (the same data as the uninterrupted run: train() seeds its generator by rank)."""
    model, optim = make("ddp", world_size, seed=123)
    train(model, optim, rank, steps=1)  # optimizer state to load into (then overwritten)
    mgr = CheckpointManager(root)
    info = mgr.restore(mgr.track(model=model, optimizer=optim))
    assert info is not None and info.step == 3
    loaded = local_state(model, optim)
    mgr.close()
    train(model, optim, rank, steps=3)
    return {"loaded": loaded, "final": local_state(model, optim)}


def load_only(rank: int, world_size: int, root: str) -> dict[str, torch.Tensor]:
    model, optim = make("ddp", world_size, seed=321)
    train(model, optim, rank, steps=1)
    mgr = CheckpointManager(root, read_only=True)
    mgr.restore(mgr.track(model=model, optimizer=optim))
    mgr.close()
    return local_state(model, optim)
