"""The coordinator's share of a save, simulated for bench_metadata_scale.py (issue 20).

Everything rank 0 does between DCP's gather of the local plans and the commit, run for real
on the plans and write results the ranks would send (built here without a process group):

- ``receive``: unpickling what DCP gathers to the coordinator (the ranks' local plans and,
  after writing, their write results);
- ``plan``: ``JsonSavePlanner.create_global_plan`` (DCP's dedup, global plan, ``Metadata``,
  validation; for compact plans the rule check) and ``DistCkptWriter.prepare_global_plan``;
- ``finish``: ``DistCkptWriter.finish``: metadata.json built and written, ``COMMITTED``,
  publish (local disk).

Modes: ``compact`` (dist_ckpt now: ranks keep the chunks a split rule describes),
``per_chunk`` (DCP's plans, one item per chunk per rank: dist_ckpt before), each without and
with DCP's plan caching (``enable_plan_caching``: unchanged local plans are not re-sent, the
cached global plan and ``Metadata`` are reused; timed on the second save).

The state: bench_metadata_scale's 2,169 Shard(0) tensors plus what AdamW and its param group
add that no rule describes: a 0-d ``step`` tensor per parameter (723, replicated) and 12
param-group values. ``per_chunk``: every rank sends them (DCP's dedup has rank 0 write them);
``compact``: only the coordinator does (the ranks agreed they hold the same, one all_reduce
not timed here).
"""

from __future__ import annotations

import pickle
import time
import uuid
from dataclasses import replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dist_ckpt import compact_plan, dcp_internals
from dist_ckpt.format.chunk_layout import entry_name
from dist_ckpt.format.metadata_json import EntryRef, FileRecord
from dist_ckpt.planner import JsonSavePlanner
from dist_ckpt.storage import DistCkptWriter, _ItemResult
from storage_backends.local import LocalBackend

FILE_SUM = "xxh3_128:" + "0" * 32 + ":" + "1" * 32
GROUP_VALUES = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "params",
)


def _shard_item(fqn: str, shape: tuple[int, ...], dtype: torch.dtype, world: int, rank: int) -> WriteItem:
    n, cs = shape[0], -(-shape[0] // world)
    offsets = torch.Size((min(rank * cs, n), *(0,) * (len(shape) - 1)))
    sizes = torch.Size((max(0, min(cs, n - rank * cs)), *shape[1:]))
    return WriteItem(
        MetadataIndex(fqn, offsets),
        WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            ChunkStorageMetadata(offsets, sizes), TensorProperties(dtype=dtype), torch.Size(shape)
        ),
    )


def _unruled_items(param_names: list[str]) -> list[WriteItem]:
    scalar = torch.Size([])
    items = [
        WriteItem(
            MetadataIndex(f"optim.state.{p}.step", scalar),
            WriteItemType.TENSOR,
            tensor_data=TensorWriteData(
                ChunkStorageMetadata(scalar, scalar), TensorProperties(dtype=torch.float32), scalar
            ),
        )
        for p in param_names
    ]
    return items + [WriteItem(MetadataIndex(f"optim.param_groups.0.{v}"), WriteItemType.BYTE_IO) for v in GROUP_VALUES]


def _full_plan(tensors: list[Any], unruled: list[WriteItem], world: int, rank: int) -> SavePlan:
    items = [_shard_item(f, s, d, world, rank) for f, s, d in tensors] + unruled
    mappings = {i.index.fqn: tuple(i.index.fqn.split(".")) for i in items}
    return SavePlan(items, planner_data=mappings)


def _unpickle_time(per_rank: list[Any]) -> float:
    """Seconds to unpickle what each rank sent (pickled one by one, as DCP's gather does)."""
    sent = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in per_rank]
    t0 = time.perf_counter()
    for b in sent:
        pickle.loads(b)
    return time.perf_counter() - t0


class Coordinator:
    """The plans and write results of one world size, and the timed coordinator steps."""

    def __init__(self, tensors: list[Any], param_names: list[str], world: int, per_chunk: bool):
        self.world, self.tensors = world, tensors
        unruled = _unruled_items(param_names)
        splits = [{f: compact_plan.MeshSplit(0, 0, world, r) for f, _, _ in tensors} for r in (0, 1)]
        firsts = [_full_plan(tensors, unruled, world, r) for r in (0, 1)]
        # the ranks hold the same replicated state (the agreement's all_reduce says so): only
        # the coordinator sends its unruled items
        sent = [
            compact_plan.split_local_plan(p, p, sp, coordinator=r == 0, agree=lambda d: True).sent
            for r, (p, sp) in enumerate(zip(firsts, splits))
        ]
        # every other rank sends what rank 1 sends, at its own place in the mesh
        self.compact = sent + [
            replace(sent[1], planner_data=replace(sent[1].planner_data, meshes=(((0, world), r),)))
            for r in range(2, world)
        ]
        self.per_chunk = [_full_plan(tensors, unruled, world, r) for r in range(world)] if per_chunk else None

    def _results(self, global_plan: list[SavePlan], compact: bool) -> list[list[WriteResult]]:
        out = []
        for r, plan in enumerate(global_plan):
            file, index = f"rank_{r:05d}.safetensors", f"index_{r:05d}.safetensors"
            rec, irec = FileRecord(r, 10**9, FILE_SUM, index), FileRecord(r, 200_000, FILE_SUM)
            # compact: the rank's first (ruled) item carries its file records, then its unruled items
            items = ([_shard_item(*self.tensors[0], self.world, r)] if compact else []) + list(plan.items)
            out.append(
                [
                    WriteResult(
                        i.index,
                        1,
                        _ItemResult(EntryRef(file, entry_name(i.index.fqn, i.index.offset), "0" * 16, 1), rec, irec),
                    )
                    for i in items
                ]
            )
        return out

    def run(self, mode: str, tmp: str) -> dict[str, Any]:
        """One save's coordinator work in ``mode`` (``compact``/``per_chunk``, ``_cached``)."""
        compact, cached = mode.startswith("compact"), mode.endswith("_cached")
        plans = self.compact if compact else self.per_chunk
        assert plans is not None
        key = f"bench.{uuid.uuid4().hex}"
        if cached:  # the first save fills DCP's caches; the second (timed) sends unusable plans
            warm = JsonSavePlanner(enable_plan_caching=True)
            dcp_internals.use_plan_cache(warm, key)
            global_plan, _ = warm.create_global_plan(plans)
            plans = [SavePlan([], usable=False)] * self.world
        planner = JsonSavePlanner(enable_plan_caching=cached)
        dcp_internals.use_plan_cache(planner, key)
        t_receive_plans = _unpickle_time(plans)
        writer = DistCkptWriter(LocalBackend(tmp), f"{mode}-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        delta, metadata = planner.create_global_plan(plans)
        writer.prepare_global_plan(delta)
        t_plan = time.perf_counter() - t0
        full_global = planner.global_plan if cached else delta
        results = self._results(full_global, compact)
        t_receive_results = _unpickle_time(results)
        t0 = time.perf_counter()
        writer.finish(metadata, results)
        t_finish = time.perf_counter() - t0
        if cached:
            dcp_internals.forget_cached_plans(key)
        return {
            "items_received": sum(len(p.items) for p in plans),
            "results_received": sum(map(len, results)),
            "receive_s": t_receive_plans + t_receive_results,
            "plan_s": t_plan,
            "finish_s": t_finish,
            "total_s": t_receive_plans + t_plan + t_receive_results + t_finish,
        }
