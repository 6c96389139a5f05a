"""Compact save plans (issue 20): what a rank sends the coordinator for tensors a split rule
describes, how the coordinator checks and resolves it, and that metadata.json is the same as
from DCP's per-chunk plans. Multi-rank saves through these hooks: tests/distributed/test_compact_plan_ranks.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from dist_ckpt import compact_plan
from dist_ckpt.compact_plan import MeshSplit
from dist_ckpt.errors import InconsistentState
from dist_ckpt.format import metadata_v2
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.planner import JsonSavePlanner

SHAPES = {"w": (10, 3), "b": (10,), "small": (2, 4)}  # "small": 2 rows over 4 ranks (2 empty chunks)
WORLD = 4


def _item(fqn: str, shape: tuple[int, ...], rank: int, world: int) -> WriteItem:
    n, cs = shape[0], -(-shape[0] // world)
    offsets = (min(rank * cs, n), *(0,) * (len(shape) - 1))
    sizes = (max(0, min(cs, n - rank * cs)), *shape[1:])
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    return WriteItem(
        MetadataIndex(fqn, torch.Size(offsets)),
        WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk, TensorProperties(dtype=torch.float32), torch.Size(shape)),
    )


def _replicated(rank: int) -> WriteItem:
    chunk = ChunkStorageMetadata(torch.Size([0]), torch.Size([1]))
    return WriteItem(
        MetadataIndex("step", torch.Size([0])),
        WriteItemType.TENSOR,
        tensor_data=TensorWriteData(chunk, TensorProperties(dtype=torch.float32), torch.Size([1])),
    )


def _full_plan(rank: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> SavePlan:
    items = [_item(f, s, rank, WORLD) for f, s in shapes.items()] + [_replicated(rank)]
    return SavePlan(items, planner_data={f: ("model", f) for f in [*shapes, "step"]})


def _splits(rank: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, MeshSplit]:
    return {f: MeshSplit(0, 0, WORLD, rank) for f in shapes}


def _compact_plans() -> list[SavePlan]:
    return [compact_plan.split_local_plan(_full_plan(r), _full_plan(r), _splits(r)).sent for r in range(WORLD)]


def test_a_rank_sends_only_unruled_items_and_the_first_rank_the_rules() -> None:
    first = compact_plan.split_local_plan(_full_plan(0), _full_plan(0), _splits(0))
    other = compact_plan.split_local_plan(_full_plan(2), _full_plan(2), _splits(2))
    assert [i.index.fqn for i in first.sent.items] == ["step"] == [i.index.fqn for i in other.sent.items]
    assert [i.index.fqn for i in other.kept] == ["w", "b", "small"] and other.ruled_fqns == {"w", "b", "small"}
    assert sorted(r.fqn for r in first.sent.planner_data.owned) == ["b", "small", "w"]
    assert other.sent.planner_data.owned == () and other.sent.planner_data.meshes == (((0, WORLD), 2),)
    # mappings: the first rank sends those of its ruled keys, every rank those of its other keys
    assert sorted(first.sent.planner_data.mappings) == ["b", "small", "step", "w"]
    assert sorted(other.sent.planner_data.mappings) == ["step"]
    assert first.sent.planner_data.digest == other.sent.planner_data.digest


def test_a_cached_plan_sends_nothing_but_keeps_the_items() -> None:
    unusable = SavePlan([], usable=False)
    split = compact_plan.split_local_plan(unusable, _full_plan(1), _splits(1))
    assert split.sent is unusable and len(split.kept) == 3


def test_coordinator_metadata_json_equals_the_per_chunk_one() -> None:
    """The coordinator's metadata from compact plans and from DCP's per-chunk plans give the
    same metadata.json (the same document; tensors may be listed in another order)."""
    compact = JsonSavePlanner()
    _, meta_c = compact._create_global_plan(_compact_plans())
    assert compact.coordinator_items == WORLD  # one replicated item per rank, no chunk
    per_chunk = JsonSavePlanner()
    _, meta_p = per_chunk._create_global_plan([_full_plan(r) for r in range(WORLD)])
    assert per_chunk.coordinator_items == WORLD * 4
    assert isinstance(meta_c.state_dict_metadata["w"].chunks, compact_plan.RuledChunks)
    assert list(meta_c.state_dict_metadata["small"].chunks) == [
        c for c in meta_p.state_dict_metadata["small"].chunks if all(c.sizes)
    ]
    assert meta_c.planner_data == meta_p.planner_data
    files = {f"rank_{r:05d}.safetensors": FileRecord(r, 1, "x:y:z", f"index_{r:05d}.safetensors") for r in range(WORLD)}
    chunk_ranks = {(i.index.fqn, i.index.offset): r for r in range(WORLD) for i in _full_plan(r).items}
    docs = [metadata_v2.dumps(m, chunk_ranks, {}, files, WORLD, "none", {}) for m in (meta_c, meta_p)]
    assert json.loads(docs[0]) == json.loads(docs[1])
    tensors = json.loads(docs[0])["tensors"]
    assert tensors["small"]["split"] == [0, 0, 2, 1] and tensors["w"]["split"] == [0, 0, 4, 3]


def test_a_rank_holding_other_dtensors_than_its_mesh_fails_the_save_naming_it() -> None:
    plans = _compact_plans()
    odd = {**SHAPES, "w": (12, 3)}  # rank 3's "w" has another shape than rank 0's rule says
    plans[3] = compact_plan.split_local_plan(_full_plan(3, odd), _full_plan(3, odd), _splits(3, odd)).sent
    with pytest.raises(InconsistentState, match="rank 3 holds DTensor shards"):
        JsonSavePlanner()._create_global_plan(plans)
    plans = _compact_plans()
    plans[2] = _full_plan(2)  # rank 2 sent no rules (not on the mesh): the mesh misses its index 2
    with pytest.raises(InconsistentState, match="not that contiguous range"):
        JsonSavePlanner()._create_global_plan(plans)


def test_global_plan_returns_unruled_items_and_finish_plan_puts_the_kept_ones_back() -> None:
    planner = JsonSavePlanner()
    global_plan, _ = planner._create_global_plan(_compact_plans())
    assert [[i.index.fqn for i in p.items] for p in global_plan] == [["step"], [], [], []]  # deduplicated to rank 0
    rank2 = JsonSavePlanner()
    rank2.plan = _full_plan(2)
    rank2.state_dict = {}
    split = compact_plan.split_local_plan(rank2.plan, rank2.plan, _splits(2))
    rank2._kept, rank2.ruled_fqns = split.kept, split.ruled_fqns
    final = rank2.finish_plan(global_plan[2])
    assert [i.index.fqn for i in final.items] == ["w", "b", "small"]
    assert create_default_global_save_plan  # DCP's helper the per-chunk path uses (imported: API present)


def test_agreed_replicated_items_are_sent_and_written_by_the_coordinator_only() -> None:
    digests: list[str] = []

    def agree(digest: str) -> bool:  # every rank passes the same digest here: the collective says "same"
        digests.append(digest)
        return True

    plans = [
        compact_plan.split_local_plan(_full_plan(r), _full_plan(r), _splits(r), coordinator=r == 0, agree=agree)
        for r in range(WORLD)
    ]
    assert len(set(digests)) == 1 and len(digests) == WORLD
    assert [[i.index.fqn for i in p.sent.items] for p in plans] == [["step"], [], [], []]
    assert [sorted(p.sent.planner_data.mappings) for p in plans] == [["b", "small", "step", "w"], [], [], []]
    planner = JsonSavePlanner()
    global_plan, meta = planner._create_global_plan([p.sent for p in plans])
    assert planner.coordinator_items == 1 and "step" in meta.state_dict_metadata
    assert meta.planner_data["step"] == ("model", "step")


def test_no_agreement_or_a_cached_plan_still_calls_the_collective_on_every_rank() -> None:
    calls: list[int] = []
    for r in range(WORLD):
        # ranks disagree: each sends its unruled items, as DCP's plans do
        split = compact_plan.split_local_plan(
            _full_plan(r), _full_plan(r), _splits(r), coordinator=r == 0, agree=lambda d, r=r: calls.append(r) or False
        )
        assert [i.index.fqn for i in split.sent.items] == ["step"]
    unusable = SavePlan([], usable=False)
    split = compact_plan.split_local_plan(
        unusable, _full_plan(1), {}, coordinator=False, agree=lambda d: calls.append(9) or True
    )
    assert split.sent is unusable and calls == [0, 1, 2, 3, 9]
    # a cached plan while the ranks now disagree: the cache may hold a plan made when they
    # agreed (no unruled items sent), so this rank's own items are sent afresh
    split = compact_plan.split_local_plan(unusable, _full_plan(1), _splits(1), coordinator=False, agree=lambda d: False)
    assert split.sent.usable and [i.index.fqn for i in split.sent.items] == ["step"] and len(split.kept) == 3
    split = compact_plan.split_local_plan(unusable, _full_plan(1), {}, coordinator=False, agree=lambda d: False)
    assert split.sent.usable and len(split.sent.items) == 4 and split.kept == ()


def test_unruled_digest_differs_when_a_replicated_tensor_differs_in_shape() -> None:
    items = _full_plan(0).items[3:]
    other = [_item("step", (2,), 0, 1)]
    assert compact_plan.unruled_digest(items, {}) != compact_plan.unruled_digest(other, {})
    assert compact_plan.unruled_digest(items, {"step": ("a",)}) != compact_plan.unruled_digest(items, {"step": ("b",)})
