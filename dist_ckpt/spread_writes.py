"""Which rank writes a tensor every rank holds: DDP's parameters and optimizer state are
spread over all ranks, everything else stays with rank 0.

Every DDP rank holds the whole model and optimizer state, so every rank's local plan lists
every tensor, and DCP keeps one copy of each. Taking rank 0's copy of everything (DCP's
``dedup_save_to_lowest_rank``) makes rank 0 write every byte while the other ranks wait. But
which copy is taken matters only where copies may differ:

* parameters of a ``DistributedDataParallel`` model and the optimizer state of those
  parameters are the same on every rank, bit for bit: DDP all-reduces the gradients (every
  rank receives the same reduced values) and each rank's optimizer applies the same update
  to the same values. These are written by all ranks in balanced parts;
* buffers (BatchNorm running statistics after the last forward are each rank's own; DDP
  broadcasts rank 0's at the next forward), tensors of models not wrapped in DDP (each rank
  may train its own), non-tensor values and anything else: rank 0's copy, as before.

Balance: rank 0's pinned items are counted first; then the spread tensors, largest first,
each go to the rank with the fewest bytes so far (ties: the lowest rank) — deterministic, so
every save with the same layout gets the same assignment (DCP's plan cache relies on it).
Loading does not care who wrote what (the metadata names each tensor's file), so resharding
to any world size works as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.nn.parallel import DistributedDataParallel

from dist_ckpt.dcp_internals import flatten_state_dict
from dist_ckpt.overlap import storage_key


def _ddp(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)  # torch.compile(ddp) too


def replicated_fqns(state: Any, state_dict: dict[str, Any], world_size: int) -> frozenset[str]:
    """The flat keys of ``state_dict`` (a TrainingState's) that hold the same value on every
    rank: parameters of tracked DDP models and their optimizers' state."""
    if world_size < 2:
        return frozenset()
    params = [p for model in state.models.values() if _ddp(model) for p in model.parameters()]
    if not params:
        return frozenset()
    param_ids = {id(p) for p in params}
    keys = {storage_key(p) for p in params}
    optimizers: Iterable[torch.optim.Optimizer] = (o for n, o in state.objects.items() if state.kinds[n] == "optimizer")
    for opt in optimizers:
        for p, per_param in opt.state.items():
            if id(p) in param_ids:
                keys.update(storage_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    keys.discard(0)
    flat, _ = flatten_state_dict(state_dict)
    return frozenset(
        fqn for fqn, v in flat.items() if type(v) in (torch.Tensor, torch.nn.Parameter) and storage_key(v) in keys
    )


def spread_plans(all_plans: list[SavePlan], spread: frozenset[str]) -> list[SavePlan]:
    """DCP's dedup step: one writer per write item (see the module docstring)."""
    holders: dict[Any, list[int]] = {}
    items: dict[Any, WriteItem] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item.index, []).append(rank)
            items[item.index] = item
    written = [0] * len(all_plans)
    chosen: dict[Any, int] = {}
    balanced = []
    for index, ranks in holders.items():
        if len(ranks) > 1 and index.fqn in spread:
            balanced.append(index)
        else:
            chosen[index] = min(ranks)
            written[chosen[index]] += items[index].tensor_storage_size() or 1
    balanced.sort(key=lambda i: (-(items[i].tensor_storage_size() or 1), i.fqn, tuple(i.offset or ())))
    for index in balanced:
        rank = min(holders[index], key=lambda r: (written[r], r))
        chosen[index] = rank
        written[rank] += items[index].tensor_storage_size() or 1
    return [
        dataclasses.replace(plan, items=[item for item in plan.items if chosen[item.index] == rank])
        for rank, plan in enumerate(all_plans)
    ]
