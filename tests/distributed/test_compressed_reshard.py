"""Compressed (zstd) shards across world sizes: save at 4 ranks, load at 2 → identical tensors;
and a resharded load reads only the chunks a rank needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _reshard_workers as workers
import torch
import torch.distributed as dist
from support.dist import run_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_ckpt.api import load_from, save_to, split_checkpoint_uri
from dist_ckpt.format.zstd_codec import ZstdCodec
from storage_backends import open_backend
from storage_backends.local import LocalBackend

CODEC = ZstdCodec(chunk_bytes=2048)  # small chunks: every tensor spans many of them


def _model(world: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 33))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: nn.Module, optim: torch.optim.Optimizer, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        loss = model(torch.randn(4, 64, generator=gen)).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def save_job(rank: int, world: int, ckpt: str, ref: str) -> None:
    model, optim = _model(world, seed=0)
    _train(model, optim, rank)
    msd, osd = get_state_dict(model, optim)
    root, name = split_checkpoint_uri(ckpt)
    save_to(open_backend(root), name, {"model": msd, "optim": osd}, codec=CODEC)
    full_m, full_o = workers.full_state(model, optim)
    if rank == 0:
        torch.save({"model": full_m, "optim": full_o}, ref)
    dist.barrier()


class CountingBackend(LocalBackend):
    """Counts the bytes of shard *entries* read (reads at offset 0 are header probes)."""

    shard_bytes = 0

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        data = super().read(key, start, length)
        if key.endswith(".safetensors") and start > 0:
            CountingBackend.shard_bytes += len(data)
        return data


def load_job(rank: int, world: int, ckpt: str, ref: str) -> int:
    model, optim = _model(world, seed=123)
    msd, osd = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    root, name = split_checkpoint_uri(ckpt)
    load_from(CountingBackend(root), name, state)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full_m, full_o = workers.full_state(model, optim)
    if rank == 0:
        expected = torch.load(ref, weights_only=True)
        workers._compare(full_m, expected["model"], "model")
        workers._compare(full_o, expected["optim"], "optim")
    return CountingBackend.shard_bytes


def test_zstd_checkpoint_saved_at_4_loads_at_2_and_3_reading_only_needed_chunks(tmp_path: Path) -> None:
    ckpt, ref = str(tmp_path / "run" / "step_000000002"), str(tmp_path / "ref.pt")
    run_ranks(save_job, 4, ckpt, ref, timeout=180)
    shard_total = sum(p.stat().st_size for p in (tmp_path / "run" / "step_000000002").glob("rank_*.safetensors"))
    # At 2 ranks each rank needs two of the four stored quarters of every tensor (whole entries).
    assert all(0 < n < 0.6 * shard_total for n in run_ranks(load_job, 2, ckpt, ref, timeout=180))
    # At 3 ranks a rank needs a third of each tensor: one stored quarter whole and *part* of the
    # next. It reads only the chunks covering that part — far less than whole quarters would be.
    read_by_rank = run_ranks(load_job, 3, ckpt, ref, timeout=180)
    for nbytes in read_by_rank:
        assert 0 < nbytes < 0.45 * shard_total, (nbytes, shard_total)
