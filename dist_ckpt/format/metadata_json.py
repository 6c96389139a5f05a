"""DCP :class:`Metadata` as JSON (DCP's own ``.metadata`` is a pickle; ours never is).

``metadata.json`` holds the DCP metadata (tensor sizes, dtypes, chunk layout), the file table
(size and checksum of every shard file, which rank wrote it), the world size, the codec, and
torch / format versions. Format 1 also lists every chunk's file, entry and checksum (O(tensors ×
ranks)); format 2 (:mod:`dist_ckpt.format.metadata_v2`, written today) describes regular
shardings by a rule and keeps per-chunk details in per-rank index files. Both are read.

Reading it needs no torch: the command line (``dist-ckpt list/inspect/verify/copy``) starts in
a fraction of the time ``import torch`` takes. :class:`CheckpointMetadata` holds the parsed,
validated records; its ``dcp`` view (DCP's own metadata objects, for loading) imports torch
the first time it is used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.dtypes import check_dtype_name, dtype_from_name, dtype_name

if TYPE_CHECKING:  # torch is imported only where DCP objects are built (loading, saving)
    from torch.distributed.checkpoint.metadata import Metadata

FORMAT = "dist_ckpt.checkpoint/1"
MAX_METADATA_BYTES = 256 * 1024 * 1024  # format 1 (no declared counts); format 2: metadata_v2.size_limit


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
    """Everything metadata.json holds. ``tensors``/``values`` are plain records (no torch);
    ``dcp`` rebuilds them as DCP objects, importing torch on first use."""

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

    @cached_property
    def dcp(self) -> Metadata:
        """The DCP :class:`Metadata` (``state_dict_metadata`` and ``storage_data``) for loading."""
        if self.format_version == 2:  # chunks and storage computed on access, not per chunk up front
            from dist_ckpt.format import dcp_view

            return dcp_view.build(self)
        import torch
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        sd_meta: dict[str, Any] = {}
        storage: dict[MetadataIndex, EntryRef] = {}
        for fqn, t in self.tensors.items():
            chunks = []
            for i, c in enumerate(t.chunks):
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
                storage[MetadataIndex(fqn, torch.Size(c.offsets), i)] = c.ref
            props = TensorProperties(dtype=dtype_from_name(t.dtype, f"tensor {fqn!r}"))
            sd_meta[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t.size), chunks=chunks)
        for fqn, ref in self.values.items():
            sd_meta[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = ref
        return Metadata(state_dict_metadata=sd_meta, planner_data=dict(self.planner_data), storage_data=storage)

    def keys(self) -> list[str]:
        """Every stored key (tensors and values), in the order metadata.json lists them."""
        return [*self.tensors, *self.values]


def _ref_json(ref: EntryRef) -> dict[str, Any]:
    return {"file": ref.file, "entry": ref.entry, "checksum": ref.checksum, "stored_bytes": ref.stored_bytes}


def dumps(meta: Metadata, files: dict[str, FileRecord], world_size: int, codec: str, versions: dict[str, str]) -> bytes:
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    storage: dict[MetadataIndex, EntryRef] = meta.storage_data or {}
    by_fqn: dict[str, dict[tuple[int, ...] | None, EntryRef]] = {}
    for index, ref in storage.items():
        by_fqn.setdefault(index.fqn, {})[tuple(index.offset) if index.offset is not None else None] = ref
    tensors, values = {}, {}
    for fqn, md in meta.state_dict_metadata.items():
        refs = by_fqn.get(fqn, {})
        if isinstance(md, TensorStorageMetadata):
            tensors[fqn] = {
                "dtype": dtype_name(md.properties.dtype),
                "size": list(md.size),
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), **_ref_json(refs[tuple(c.offsets)])}
                    for c in md.chunks
                ],
            }
        else:
            values[fqn] = _ref_json(refs[None])
    doc = {
        "format": FORMAT,
        "world_size": world_size,
        "codec": codec,
        "versions": versions,
        "files": {name: {"rank": r.rank, "size": r.size, "checksum": r.checksum} for name, r in sorted(files.items())},
        "tensors": tensors,
        "values": values,
        "planner_data": {k: list(v) for k, v in (meta.planner_data or {}).items()},
    }
    return json.dumps(doc, indent=1, sort_keys=False).encode("utf-8")


def _ref(obj: Any, where: str, files: dict[str, FileRecord]) -> EntryRef:
    try:
        ref = EntryRef(str(obj["file"]), str(obj["entry"]), str(obj["checksum"]), int(obj["stored_bytes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"{where}: malformed storage reference ({e})") from e
    if ref.file not in files:
        raise CorruptCheckpoint(f"{where}: refers to file {ref.file!r}, which is not in the file table")
    return ref


def _ints(obj: Any, where: str) -> list[int]:
    if not isinstance(obj, list) or not all(type(v) is int and v >= 0 for v in obj):
        raise CorruptCheckpoint(f"{where}: expected a list of non-negative integers, found {obj!r:.80}")
    return obj


def size_limit(prologue: bytes) -> int:
    """The size metadata.json may have, from its first bytes (format 2 declares its counts)."""
    from dist_ckpt.format import metadata_v2

    return metadata_v2.size_limit(prologue) or MAX_METADATA_BYTES


def loads(data: bytes, where: str) -> CheckpointMetadata:
    """Parse metadata.json. Anything unexpected raises :class:`CorruptCheckpoint` naming ``where``."""
    limit = size_limit(data[:4096])
    if len(data) > limit:
        raise CorruptCheckpoint(f"{where}: {len(data)} bytes exceeds the {limit}-byte metadata size limit")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpoint(
            f"{where}: not valid JSON ({e.__class__.__name__}); dist_ckpt metadata is always JSON, "
            "never a pickle — this file is damaged or was replaced"
        ) from e
    from dist_ckpt.format import metadata_v2

    if isinstance(doc, dict) and doc.get("format") == metadata_v2.FORMAT:
        return metadata_v2.parse(doc, where, data[:4096])
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CorruptCheckpoint(f"{where}: expected format {FORMAT!r} or {metadata_v2.FORMAT!r}, found {found!r}")
    try:
        from storage_backends.base import validate_key

        files = {}
        for name, rec in doc["files"].items():
            validate_key(name)
            if "/" in name:
                raise ValueError(f"file name {name!r} must not contain '/'")
            files[name] = FileRecord(int(rec["rank"]), int(rec["size"]), str(rec["checksum"]))
        tensors: dict[str, TensorRecord] = {}
        for fqn, t in doc["tensors"].items():
            chunks = []
            for c in t["chunks"]:
                offsets, sizes = _ints(c["offsets"], f"{where}: {fqn}"), _ints(c["sizes"], f"{where}: {fqn}")
                chunks.append(ChunkRecord(tuple(offsets), tuple(sizes), _ref(c, f"{where}: tensor {fqn!r}", files)))
            dtype = check_dtype_name(t["dtype"], f"{where}: tensor {fqn!r}")
            tensors[str(fqn)] = TensorRecord(dtype, tuple(_ints(t["size"], where)), tuple(chunks))
        values = {str(fqn): _ref(v, f"{where}: value {fqn!r}", files) for fqn, v in doc["values"].items()}
        return CheckpointMetadata(
            tensors=tensors,
            values=values,
            planner_data={k: tuple(p) for k, p in doc.get("planner_data", {}).items()},
            files=files,
            world_size=int(doc["world_size"]),
            codec=str(doc.get("codec", "none")),
            versions={str(k): str(v) for k, v in doc.get("versions", {}).items()},
        )
    except CorruptCheckpoint:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: malformed metadata ({e.__class__.__name__}: {e})") from e
