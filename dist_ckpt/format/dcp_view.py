"""DCP's :class:`Metadata` over format-2 records without building an object per chunk.

At 1,024 ranks a 70B state has 2.2 million chunks; building DCP's objects for all of them costs
every restoring rank tens of seconds. Here a tensor's ``chunks`` are a sequence computed on
access from its layout rule, ``storage_data`` a mapping computed per lookup, and
:func:`narrow_for` gives DCP's load planner, per tensor, only the saved chunks that overlap what
this rank holds (found by arithmetic on the rule), so planning is O(tensors × overlap) instead
of O(tensors × ranks). Imports torch (the command line never loads this module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from dist_ckpt.format.dtypes import dtype_from_name
from dist_ckpt.format.metadata_records import CheckpointMetadata, ChunkRecord, EntryRef, TensorRecord


class RuleChunks(Sequence[ChunkStorageMetadata]):
    """A tensor's chunks as DCP objects, built on access from its format-2 record."""

    def __init__(self, record: TensorRecord):
        self.record = record
        self._by_offsets: dict[tuple[int, ...], int] | None = None

    def __len__(self) -> int:
        return len(self.record.chunks)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c = self.record.chunks[i]
        return ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))

    def __iter__(self) -> Iterator[ChunkStorageMetadata]:
        return (
            ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in self.record.chunks
        )

    def find(self, offsets: tuple[int, ...]) -> ChunkRecord | None:
        """The chunk stored at ``offsets`` (O(1) for a rule)."""
        rule = _rule(self.record)
        if rule is not None:
            i = _index_at(rule, offsets)
            return self.record.chunks[i] if i is not None else None
        if self._by_offsets is None:
            self._by_offsets = {c.offsets: i for i, c in enumerate(self.record.chunks)}
        i = self._by_offsets.get(offsets)
        return self.record.chunks[i] if i is not None else None

    def overlapping(self, local: ChunkStorageMetadata) -> list[ChunkStorageMetadata]:
        """The saved chunks that can overlap ``local`` (all of them where no rule applies)."""
        rule = _rule(self.record)
        if rule is None:
            return list(self)
        d = rule.dim
        lo, n = int(local.offsets[d]), int(local.sizes[d])
        if n == 0 or rule.chunk == 0:
            return []
        first, last = lo // rule.chunk, min((lo + n - 1) // rule.chunk, rule.count - 1)
        return [self[i] for i in range(first, last + 1)]


def _rule(record: TensorRecord) -> Any:
    return getattr(getattr(record.chunks, "layout", None), "rule", None)


def _index_at(rule: Any, offsets: tuple[int, ...]) -> int | None:
    if len(offsets) != len(rule.size):
        return None
    at = offsets[rule.dim]
    candidates = [at // rule.chunk] if rule.chunk else []
    # empty trailing chunks sit at offset n: the first one of them is also a candidate
    if rule.chunk and at == rule.size[rule.dim]:
        candidates.append(-(-at // rule.chunk))
    for i in candidates:
        if 0 <= i < rule.count and rule.box(i)[0] == offsets:
            return i
    return None


class RuleStorageData(Mapping[MetadataIndex, EntryRef]):
    """``MetadataIndex -> EntryRef`` computed per lookup (checksums unresolved: see
    :meth:`CheckpointMetadata.resolve`)."""

    def __init__(self, meta: CheckpointMetadata, chunks: Mapping[str, RuleChunks]):
        self.meta, self.chunks = meta, chunks

    def __getitem__(self, index: MetadataIndex) -> EntryRef:
        if index.offset is None:
            return self.meta.values[index.fqn]
        found = self.chunks[index.fqn].find(tuple(index.offset)) if index.fqn in self.chunks else None
        if found is None:
            raise KeyError(index)
        return found.ref

    def __iter__(self) -> Iterator[MetadataIndex]:
        for fqn, chunks in self.chunks.items():
            for c in chunks.record.chunks:
                yield MetadataIndex(fqn, torch.Size(c.offsets))
        for fqn in self.meta.values:
            yield MetadataIndex(fqn)

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks.values()) + len(self.meta.values)


def build(meta: CheckpointMetadata) -> Metadata:
    """DCP's Metadata over ``meta`` (format 2) in O(tensors + values)."""
    sd_meta: dict[str, Any] = {}
    chunks: dict[str, RuleChunks] = {}
    for fqn, t in meta.tensors.items():
        chunks[fqn] = RuleChunks(t)
        props = TensorProperties(dtype=dtype_from_name(t.dtype, f"tensor {fqn!r}"))
        sd_meta[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t.size), chunks=chunks[fqn])  # type: ignore[arg-type]
    for fqn in meta.values:
        sd_meta[fqn] = BytesStorageMetadata()
    return Metadata(
        state_dict_metadata=sd_meta, planner_data=dict(meta.planner_data), storage_data=RuleStorageData(meta, chunks)
    )


def narrow_for(metadata: Metadata, state_dict: Mapping[str, Any]) -> Metadata:
    """``metadata`` with each rule-described tensor of ``state_dict`` cut down to the saved
    chunks overlapping this rank's part of it (DCP's planner then works on those only)."""
    from dist_ckpt.dcp_internals import create_chunk_list

    narrowed = dict(metadata.state_dict_metadata)
    for fqn, obj in state_dict.items():
        md = narrowed.get(fqn)
        if not isinstance(md, TensorStorageMetadata) or not isinstance(md.chunks, RuleChunks):
            continue
        if getattr(obj, "size", None) is None or md.size != obj.size():
            continue  # DCP's planner reports the mismatch
        seen: dict[tuple[int, ...], ChunkStorageMetadata] = {}
        for local in create_chunk_list(obj):
            for c in md.chunks.overlapping(local):
                seen.setdefault(tuple(c.offsets), c)
        narrowed[fqn] = TensorStorageMetadata(properties=md.properties, size=md.size, chunks=list(seen.values()))
    return Metadata(
        state_dict_metadata=narrowed, planner_data=metadata.planner_data, storage_data=metadata.storage_data
    )


def dcp_metadata(meta: CheckpointMetadata) -> Metadata:
    """The DCP :class:`Metadata` (``state_dict_metadata`` and ``storage_data``) for loading."""
    if meta.format_version == 2:  # chunks and storage computed on access, not per chunk up front
        return build(meta)
    sd_meta: dict[str, Any] = {}
    storage: dict[MetadataIndex, EntryRef] = {}
    for fqn, t in meta.tensors.items():
        chunks = []
        for i, c in enumerate(t.chunks):
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
            storage[MetadataIndex(fqn, torch.Size(c.offsets), i)] = c.ref
        props = TensorProperties(dtype=dtype_from_name(t.dtype, f"tensor {fqn!r}"))
        sd_meta[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t.size), chunks=chunks)
    for fqn, ref in meta.values.items():
        sd_meta[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = ref
    return Metadata(state_dict_metadata=sd_meta, planner_data=dict(meta.planner_data), storage_data=storage)
