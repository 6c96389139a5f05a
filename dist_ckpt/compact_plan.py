"""Save plans the coordinator handles in O(tensors + ranks) where a split rule describes them.

DCP gathers every rank's local plan (one ``WriteItem`` per chunk) on the coordinator, builds a
global plan and ``Metadata`` listing every chunk of every rank, and gathers a ``WriteResult``
per chunk for ``StorageWriter.finish``: O(tensors × ranks) there, every save (plan caching
skips re-sending unchanged plans, not the results nor metadata.json's per-chunk pass).

A DTensor sharded ``Shard(d)`` over a 1-D mesh of contiguous ranks is split exactly as a
:class:`~dist_ckpt.format.chunk_layout.SplitRule` says, and every rank of the mesh can compute
that rule from its own DTensor. So, through DCP's public planner hooks:

- ``create_local_plan`` (every rank): the items of such tensors stay on the rank
  (:class:`LocalSplit`); the plan sent holds the other items and a :class:`CompactPlanData`:
  the rank's place in each mesh, the rules of the meshes it is the first rank of (mesh index
  0), the flatten mappings of those and of its other keys only, and a digest of all the rules
  it holds. The other items (replicated state: plain tensors such as AdamW's ``step``,
  values) are agreed by one ``all_reduce`` of a digest (:func:`agreement`): where every rank
  holds the same, only the coordinator sends and writes them (DCP's dedup to the lowest rank
  would pick it from every rank's copy); where they differ, every rank sends its own;
- ``create_global_plan`` (coordinator): resolves each mesh to process-group ranks, checks each
  rank's digest against the rules its meshes' first ranks sent (a rank that holds other
  DTensors than its mesh peers fails the save, naming the rank), and adds the ruled tensors to
  ``Metadata`` as :class:`RuledChunks` (chunks computed on access);
- ``finish_plan`` (every rank): puts the kept items back, so each rank writes all its chunks;
- the writer returns one ``WriteResult`` per unruled item (and one for a rank's file), and
  ``metadata_v2.dumps`` writes a ruled tensor's rule without looking at its chunks.

What stays O(ranks × items) at the coordinator: the items no rule describes where the ranks'
replicated state differs (then each rank's are sent, as DCP does), and the chunks of tensors no
rule fits (2-D meshes such as HSDP, strided or uneven shards, ShardedTensor): DCP's per-chunk
items. DCP still gathers one plan object and one result list per rank: O(ranks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from dist_ckpt.errors import InconsistentState
from dist_ckpt.format.chunk_layout import SplitRule


@dataclass(frozen=True)
class MeshSplit:
    """How one rank's DTensor is split: ``Shard(dim)`` over the 1-D mesh of global ranks
    ``mesh_first .. mesh_first + mesh_count - 1``, this rank at ``index`` of it."""

    dim: int
    mesh_first: int
    mesh_count: int
    index: int

    @property
    def mesh(self) -> tuple[int, int]:
        return (self.mesh_first, self.mesh_count)


@dataclass(frozen=True)
class RuledTensor:
    """A tensor every rank of ``mesh`` holds a ``torch.chunk`` part of, along ``dim``."""

    fqn: str
    properties: TensorProperties
    size: tuple[int, ...]
    dim: int
    mesh: tuple[int, int]  # (first global rank, rank count)

    def rule(self, first_rank: int) -> SplitRule:
        """The split rule with chunk ``i`` on process-group rank ``first_rank + i``."""
        count = self.mesh[1]
        return SplitRule(self.size, self.dim, first_rank, count, -(-self.size[self.dim] // count))

    def key(self) -> list[Any]:
        return [self.fqn, str(self.properties.dtype), list(self.size), self.dim]


@dataclass(frozen=True)
class CompactPlanData:
    """What a rank sends the coordinator as its plan's ``planner_data``."""

    mappings: dict[str, Any]
    meshes: tuple[tuple[tuple[int, int], int], ...]  # (mesh, this rank's index in it)
    owned: tuple[RuledTensor, ...]  # the rules of the meshes this rank is index 0 of
    digest: str  # of every rule this rank holds (see rules_digest)


def split_of(obj: Any) -> MeshSplit | None:
    """The :class:`MeshSplit` of a DTensor that a rule describes, else None."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard

    if not isinstance(obj, DTensor):
        return None
    mesh = obj.device_mesh
    coord = mesh.get_coordinate()
    if mesh.ndim != 1 or coord is None or len(obj.placements) != 1 or type(obj.placements[0]) is not Shard:
        return None  # 2-D meshes, replication, strided shards: DCP's per-chunk items
    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if ranks != list(range(ranks[0], ranks[0] + len(ranks))) or obj.ndim == 0:
        return None
    dim = obj.placements[0].dim % obj.ndim
    if obj.shape[dim] == 0:
        return None
    return MeshSplit(dim, ranks[0], len(ranks), int(coord[0]))


def rules_digest(rules: Iterable[RuledTensor]) -> str:
    """A digest of a set of rules that the coordinator can recompute per rank from the
    rules grouped by mesh (one hash per mesh, then one over the meshes)."""
    groups: dict[tuple[int, int], list[list[Any]]] = {}
    for r in rules:
        groups.setdefault(r.mesh, []).append(r.key())
    return _digest({mesh: _digest(sorted(keys)) for mesh, keys in groups.items()})


def _digest(obj: Any) -> str:
    if isinstance(obj, dict):
        obj = sorted([list(k), v] for k, v in obj.items())
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class LocalSplit:
    """A rank's local plan split into what it sends and what it keeps."""

    sent: SavePlan
    kept: tuple[WriteItem, ...]
    ruled_fqns: frozenset[str]


@runtime_checkable
class RuledPlanner(Protocol):
    """A save planner that leaves the items a split rule describes out of the coordinator's
    plan (:class:`dist_ckpt.planner.JsonSavePlanner`): its writer returns no result for them."""

    ruled_fqns: frozenset[str]


def unruled_digest(items: Iterable[WriteItem], mappings: Mapping[str, Any]) -> str:
    """A digest of the items no rule describes (keys, offsets, kinds, shapes, dtypes) and their
    mappings: equal on every rank when every rank holds the same replicated state."""
    keys = []
    for i in items:
        td = i.tensor_data
        offset = None if i.index.offset is None else list(i.index.offset)
        shape = (
            None
            if td is None
            else [list(td.size), str(td.properties.dtype), list(td.chunk.offsets), list(td.chunk.sizes)]
        )
        keys.append([i.index.fqn, offset, int(i.type.value), shape, repr(mappings.get(i.index.fqn))])
    return _digest(sorted(keys, key=repr))


def split_local_plan(
    plan: SavePlan,
    full: SavePlan,
    splits: Mapping[str, MeshSplit],
    *,
    coordinator: bool = True,
    agree: Callable[[str | None], bool] | None = None,
) -> LocalSplit:
    """``full``: this rank's whole local plan; ``plan``: what DCP would send (``full``, or an
    empty unusable plan when the cached plan is reused); ``splits``: the ruled DTensors.

    ``agree`` (a collective: every rank calls it, with its :func:`unruled_digest`) tells
    whether every rank holds the same unruled items; then only the coordinator sends (and
    writes) them — what DCP's dedup to the lowest rank would decide from every rank's copy."""
    mappings = full.planner_data if isinstance(full.planner_data, dict) else {}
    kept: list[WriteItem] = []
    rules: dict[str, RuledTensor] = {}
    for item in full.items:
        split = splits.get(item.index.fqn)
        if split is None or item.type != WriteItemType.SHARD or item.tensor_data is None:
            continue
        td = item.tensor_data
        rt = RuledTensor(item.index.fqn, td.properties, tuple(td.size), split.dim, split.mesh)
        if (tuple(td.chunk.offsets), tuple(td.chunk.sizes)) != rt.rule(0).box(split.index):
            continue  # not the chunk the rule gives it: sent as DCP's item
        kept.append(item)
        rules[rt.fqn] = rt
    unruled = [i for i in full.items if i.index.fqn not in rules]
    # every rank calls the collective, whatever it sends
    replicated = agree(unruled_digest(unruled, mappings)) if agree is not None else False
    drop_unruled = replicated and not coordinator
    if not plan.usable and agree is not None and not replicated:
        # The cached plan may date from a save where the ranks agreed (and this rank sent no
        # unruled item); now they differ, so this rank's own items must reach the coordinator.
        plan = full
    if not rules and not drop_unruled:
        return LocalSplit(plan, (), frozenset())
    if not plan.usable:  # the cached plan is reused: nothing is sent
        return LocalSplit(plan, tuple(kept), frozenset(rules))
    meshes = {splits[f].mesh: splits[f].index for f in rules}
    owned = tuple(r for r in rules.values() if meshes[r.mesh] == 0)
    owned_fqns = {r.fqn for r in owned}
    data = CompactPlanData(
        mappings={k: v for k, v in mappings.items() if k in owned_fqns or (k not in rules and not drop_unruled)},
        meshes=tuple(sorted(meshes.items())),
        owned=owned,
        digest=rules_digest(rules.values()),
    )
    sent = replace(
        plan, items=[] if drop_unruled else [i for i in plan.items if i.index.fqn not in rules], planner_data=data
    )
    return LocalSplit(sent, tuple(kept), frozenset(rules))


def agreement(group: Any = None) -> Callable[[str | None], bool]:
    """A collective over ``group``: whether every rank passed the same digest (one
    ``all_reduce`` of two integers: min == max)."""
    import torch.distributed as dist

    def same_everywhere(digest: str | None) -> bool:
        """``None``: this rank failed to plan (it raises next); it still takes part, and no rank
        sees an agreement (its -1 is below every digest's value)."""
        backend = str(dist.get_backend(group))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        h = int(digest[:15], 16) if digest is not None else -1
        t = torch.tensor([h, -h], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t[0]) == -int(t[1])

    return same_everywhere


def unpack(all_plans: Sequence[SavePlan]) -> tuple[list[SavePlan], list[CompactPlanData]] | None:
    """The plans with plain mappings as ``planner_data``, and each rank's compact data; None
    where no rank sent any (DCP's planning then runs unchanged)."""
    if not any(isinstance(p.planner_data, CompactPlanData) for p in all_plans):
        return None
    data = [
        p.planner_data
        if isinstance(p.planner_data, CompactPlanData)
        else CompactPlanData(p.planner_data or {}, (), (), rules_digest(()))
        for p in all_plans
    ]
    return [replace(p, planner_data=d.mappings) for p, d in zip(all_plans, data)], data


def resolve(data: Sequence[CompactPlanData]) -> dict[str, tuple[RuledTensor, SplitRule]]:
    """The ruled tensors with their rules in process-group ranks, after checking that every
    rank holds exactly the rules its meshes' first ranks sent. O(tensors + ranks × meshes)."""
    members: dict[tuple[int, int], dict[int, int]] = {}  # mesh -> index -> process-group rank
    for pg_rank, d in enumerate(data):
        for mesh, index in d.meshes:
            members.setdefault(mesh, {})[index] = pg_rank
    first: dict[tuple[int, int], int] = {}
    for mesh, at in members.items():
        start = at.get(0, -1)
        if sorted(at.items()) != [(i, start + i) for i in range(mesh[1])]:
            raise InconsistentState(
                f"DTensors on the mesh of global ranks {mesh[0]}..{sum(mesh) - 1}: the ranks of this save that "
                f"hold them are not that contiguous range in process-group order (found {sorted(at.items())[:8]} "
                "as (mesh index, rank)); save every rank of the mesh in one process group"
            )
        first[mesh] = start
    by_mesh: dict[tuple[int, int], list[RuledTensor]] = {}
    ruled: dict[str, tuple[RuledTensor, SplitRule]] = {}
    for d in data:
        for r in d.owned:
            if r.fqn in ruled:
                raise InconsistentState(f"{r.fqn}: two meshes' first ranks both sent a split rule for it")
            by_mesh.setdefault(r.mesh, []).append(r)
            ruled[r.fqn] = (r, r.rule(first[r.mesh]))
    group = {mesh: _digest(sorted(r.key() for r in rs)) for mesh, rs in by_mesh.items()}
    for pg_rank, d in enumerate(data):
        expected = _digest({mesh: group[mesh] for mesh, _ in d.meshes if mesh in group})
        if d.digest != expected:
            raise InconsistentState(
                f"rank {pg_rank} holds DTensor shards (meshes {[m for m, _ in d.meshes]}) whose keys, shapes, "
                "dtypes or split dims differ from those of the first rank of its mesh; every rank of a mesh "
                "must save the same sharded tensors"
            )
    return ruled


class RuledChunks(Sequence[ChunkStorageMetadata]):
    """A ruled tensor's non-empty chunks as DCP objects, computed on access."""

    def __init__(self, rule: SplitRule):
        n = rule.size[rule.dim]
        # empty trailing chunks are never stored in metadata (format 2 leaves them out)
        self.rule = replace(rule, count=min(rule.count, -(-n // rule.chunk)))

    def __len__(self) -> int:
        return self.rule.count

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        offsets, sizes = self.rule.box(i)
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))

    def __iter__(self) -> Iterator[ChunkStorageMetadata]:
        return (self[i] for i in range(len(self)))


def add_ruled(
    metadata: Metadata, ruled: Mapping[str, tuple[RuledTensor, SplitRule]], data: Sequence[CompactPlanData]
) -> Metadata:
    """``metadata`` (of the unruled items) with the ruled tensors and their mappings added."""
    sd = dict(metadata.state_dict_metadata)
    for fqn, (r, rule) in ruled.items():
        if fqn in sd:
            raise InconsistentState(f"{fqn}: sent as a DTensor split rule by one rank and as chunks by another")
        sd[fqn] = TensorStorageMetadata(properties=r.properties, size=torch.Size(r.size), chunks=RuledChunks(rule))  # type: ignore[arg-type]
    mappings = dict(metadata.planner_data or {})
    for d in data:
        for r in d.owned:
            if r.fqn in d.mappings:
                mappings[r.fqn] = d.mappings[r.fqn]
    return replace(metadata, state_dict_metadata=sd, planner_data=mappings)
