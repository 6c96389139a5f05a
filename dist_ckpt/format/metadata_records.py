"""The parsed records of ``metadata.json`` (both formats), with no parser and no torch: the
parsers (:mod:`dist_ckpt.format.metadata_json`, :mod:`dist_ckpt.format.metadata_v2`) build them
and DCP's view of them (:func:`dist_ckpt.format.dcp_view.dcp_metadata`) reads them, so every
dependency points here and none back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint


@dataclass(frozen=True)
class EntryRef:
    """Where one tensor chunk or value is stored (DCP ``storage_data`` per ``MetadataIndex``)."""

    file: str
    entry: str
    checksum: str  # "" in format 2 until resolved from the file's rank index
    stored_bytes: int  # -1 likewise


@dataclass(frozen=True)
class FileRecord:
    rank: int
    size: int
    checksum: str
    index: str | None = None  # format 2: the name of this shard's rank index file


@dataclass(frozen=True)
class ChunkRecord:
    """One stored chunk of a tensor: its box in the full tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    ref: EntryRef


@dataclass(frozen=True)
class TensorRecord:
    dtype: str  # torch's name without "torch.", e.g. "bfloat16"
    size: tuple[int, ...]
    chunks: Sequence[ChunkRecord]  # format 2: computed on access from the layout rule


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything metadata.json holds: plain records (no torch); :func:`dcp_view.dcp_metadata`
    rebuilds them as DCP objects for loading."""

    tensors: dict[str, TensorRecord]
    values: dict[str, EntryRef]
    planner_data: dict[str, tuple[Any, ...]]
    files: dict[str, FileRecord]
    world_size: int
    codec: str
    versions: dict[str, str]
    format_version: int = 1
    # format 2: reads the per-rank index files on demand (set by read_checkpoint_metadata)
    indexes: Any = field(default=None, compare=False, repr=False)

    def resolve(self, ref: EntryRef) -> EntryRef:
        """``ref`` with its checksum and stored size (format 2: from its file's rank index)."""
        if ref.checksum:
            return ref
        if self.indexes is None:
            raise CorruptCheckpoint(f"{ref.file}: entry {ref.entry!r} has no checksum and no rank index is open")
        found = self.indexes.entries(ref.file).get(ref.entry)
        if found is None:
            raise CorruptCheckpoint(f"{ref.file}: entry {ref.entry!r} is missing from the shard's rank index")
        # an incremental checkpoint's entry may live in a referenced file of an earlier step
        return EntryRef(getattr(found, "location", None) or ref.file, ref.entry, found[0], found[1])

    def max_entries(self) -> int:
        """The most entries any one shard can hold (sizes the rank index limit): a rule puts at
        most one chunk of its tensor on a rank; listed chunks may all be on one."""
        n = len(self.values)
        for t in self.tensors.values():
            layout = getattr(t.chunks, "layout", None)
            n += 1 if layout is not None and layout.rule is not None else len(t.chunks)
        return n

    def keys(self) -> list[str]:
        """Every stored key (tensors and values), in the order metadata.json lists them."""
        return [*self.tensors, *self.values]
