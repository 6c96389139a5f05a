"""DCP :class:`Metadata` as JSON (DCP's own ``.metadata`` is a pickle; ours never is).

``metadata.json`` holds the DCP metadata (tensor sizes, dtypes, chunk layout), where each
chunk and value lives (file, entry, checksum), the file table (size and checksum of every shard
file, which rank wrote it), the world size, the codec, and torch / format versions.

Reading it needs no torch: the command line (``dist-ckpt list/inspect/verify/copy``) starts in
a fraction of the time ``import torch`` takes. :class:`CheckpointMetadata` holds the parsed,
validated records; its ``dcp`` view (DCP's own metadata objects, for loading) imports torch
the first time it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import CorruptCheckpoint

if TYPE_CHECKING:  # torch is imported only where DCP objects are built (loading, saving)
    import torch
    from torch.distributed.checkpoint.metadata import Metadata

FORMAT = "dist_ckpt.checkpoint/1"
MAX_METADATA_BYTES = 256 * 1024 * 1024

# dtype name (as torch spells it, without "torch.") -> bytes per element
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "bool": 1, "complex64": 8, "complex128": 16,
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in ITEMSIZE:
        raise CorruptCheckpoint(f"{where}: unknown dtype {name!r}")
    return name


def dtype_from_name(name: str, where: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, check_dtype_name(name, where), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpoint(f"{where}: dtype {name!r} is not supported by this torch ({torch.__version__})")
    return dtype


@dataclass(frozen=True)
class EntryRef:
    """Where one tensor chunk or value is stored (DCP ``storage_data`` per ``MetadataIndex``)."""

    file: str
    entry: str
    checksum: str
    stored_bytes: int


@dataclass(frozen=True)
class FileRecord:
    rank: int
    size: int
    checksum: str


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
    chunks: tuple[ChunkRecord, ...]


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

    @cached_property
    def dcp(self) -> Metadata:
        """The DCP :class:`Metadata` (``state_dict_metadata`` and ``storage_data``) for loading."""
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


def loads(data: bytes, where: str) -> CheckpointMetadata:
    """Parse metadata.json. Anything unexpected raises :class:`CorruptCheckpoint` naming ``where``."""
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(f"{where}: {len(data)} bytes exceeds the metadata size limit")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpoint(
            f"{where}: not valid JSON ({e.__class__.__name__}); dist_ckpt metadata is always JSON, "
            "never a pickle — this file is damaged or was replaced"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CorruptCheckpoint(f"{where}: expected format {FORMAT!r}, found {found!r}")
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
