"""Per-rank bodies of tests/distributed/test_incremental_fsdp.py (run through support.dist.run_ranks).

An FSDP2 model whose first half (two Linear layers) is frozen and whose second half trains with
AdamW is saved by a CheckpointManager with ``incremental=True`` (async saves, ``keep_last=2``),
four times. After each save rank 0 writes the full (gathered) model and optimizer state to a
reference safetensors file. Loading builds the model at another world size with another init,
restores, gathers, and compares bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from dist_ckpt import CheckpointManager
from storage_backends import open_backend

STEPS = (1, 2, 3, 4)


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    for layer in (model[0], model[2]):  # the frozen half
        for p in layer.parameters():
            p.requires_grad_(False)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    gen = torch.Generator().manual_seed(100 * step + rank)
    loss = model(torch.randn(8, 64, generator=gen)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the gathered model and optimizer state (collective)."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out: dict[str, torch.Tensor] = {}

    def flatten(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                flatten(f"{prefix}.{k}", v)

    flatten("model", msd)
    flatten("optim", osd)
    # (with cpu_offload the gathered state is on rank 0 only)
    assert not torch.distributed.get_rank() == 0 or any(k.endswith("exp_avg") for k in out), sorted(out)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_job(rank: int, world: int, root: str, refs: str, compression: str) -> dict[str, Any]:
    model, opt = build(0)
    with CheckpointManager(root, keep_last=2, incremental=True, async_save=True, compression=compression) as mgr:
        state = mgr.track(model=model, optimizer=opt)
        for step in STEPS:
            train_step(model, opt, rank, step)
            full = full_state(model, opt)
            if rank == 0:
                save_file(full, f"{refs}/step_{step}.safetensors")
            mgr.save(step, state)
        mgr.wait()
        infos = [(c.step, c.size, c.logical_size) for c in mgr.checkpoints()]
    backend = open_backend(root)
    files = {s: sorted(json.loads(backend.read(f"step_{s:09d}/metadata.json"))["files"]) for s, _, _ in infos}
    return {"checkpoints": infos, "files": files}


def load_job(rank: int, world: int, root: str, refs: str, step: int) -> bool:
    model, opt = build(123)
    train_step(model, opt, rank, 99)  # optimizer state exists and differs from the saved one
    with CheckpointManager(root, read_only=True) as mgr:
        mgr.restore(mgr.track(model=model, optimizer=opt), which=step)
    got = full_state(model, opt)
    if rank == 0:
        expected = load_file(f"{refs}/step_{step}.safetensors")
        assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and torch.equal(
                got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
            ), k
    return True


def build_ddp(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 5))
    for p in model[0].parameters():  # frozen: replicated, written by rank 0 once
        p.requires_grad_(False)
    model = DistributedDataParallel(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def ddp_job(rank: int, world: int, root: str, compression: str) -> dict[str, Any]:
    """DDP, async incremental saves, restored into a fresh DDP job of the same ranks."""
    model, opt = build_ddp(0)
    with CheckpointManager(root, keep_last=2, incremental=True, async_save=True, compression=compression) as mgr:
        state = mgr.track(model=model, optimizer=opt)
        for step in STEPS:
            train_step(model, opt, rank, step)
            mgr.save(step, state)
        mgr.wait()
        infos = [(c.step, c.size, c.logical_size) for c in mgr.checkpoints()]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_opt = build_ddp(5)
    train_step(fresh, fresh_opt, rank, 99)
    with CheckpointManager(root, read_only=True) as mgr:
        mgr.restore(mgr.track(model=fresh, optimizer=fresh_opt))
    got = fresh.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    return {"checkpoints": infos}
