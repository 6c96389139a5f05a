"""Per-rank body of tests/distributed/test_format1_reshard.py: the one-rank format-1 fixture
loaded into DTensors sharded over this job's ranks (Shard(0) and Shard(1))."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import dist_ckpt


def load_sharded(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = {
        "w": distribute_tensor(torch.zeros(7, 5), mesh, [Shard(0)]),  # 7 rows: uneven over the ranks
        "b": distribute_tensor(torch.zeros(7, dtype=torch.int64), mesh, [Shard(0)]),
        "h": distribute_tensor(torch.zeros(3, 4, dtype=torch.bfloat16), mesh, [Shard(1)]),
    }
    state = {"model": model, "step": None, "note": None}
    dist_ckpt.load(state, ckpt)
    full = {k: v.full_tensor() for k, v in state["model"].items()}
    return {"model": full, "step": state["step"], "note": state["note"]}
