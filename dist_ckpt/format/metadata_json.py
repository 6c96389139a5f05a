"""DCP :class:`Metadata` as JSON (DCP's own ``.metadata`` is a pickle; ours never is).

``metadata.json`` holds the DCP metadata (tensor sizes, dtypes, chunk layout), where each
chunk and value lives (file, entry, checksum), the file table (size and checksum of every shard
file, which rank wrote it), the world size, the codec, and torch / format versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

from dist_ckpt.errors import CorruptCheckpoint

FORMAT = "dist_ckpt.checkpoint/1"
MAX_METADATA_BYTES = 256 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32",
        "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptCheckpoint(f"{where}: unknown dtype {name!r}") from None


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
class CheckpointMetadata:
    """Everything metadata.json holds, with the DCP part rebuilt as DCP objects."""

    dcp: Metadata
    files: dict[str, FileRecord]
    world_size: int
    codec: str
    versions: dict[str, str]


def _ref_json(ref: EntryRef) -> dict[str, Any]:
    return {"file": ref.file, "entry": ref.entry, "checksum": ref.checksum, "stored_bytes": ref.stored_bytes}


def dumps(meta: Metadata, files: dict[str, FileRecord], world_size: int, codec: str, versions: dict[str, str]) -> bytes:
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
        sd_meta: dict[str, Any] = {}
        storage: dict[MetadataIndex, EntryRef] = {}
        for fqn, t in doc["tensors"].items():
            chunks = []
            for i, c in enumerate(t["chunks"]):
                offsets, sizes = _ints(c["offsets"], f"{where}: {fqn}"), _ints(c["sizes"], f"{where}: {fqn}")
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
                storage[MetadataIndex(fqn, torch.Size(offsets), i)] = _ref(c, f"{where}: tensor {fqn!r}", files)
            props = TensorProperties(dtype=dtype_from_name(t["dtype"], f"{where}: tensor {fqn!r}"))
            sd_meta[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(_ints(t["size"], where)), chunks=chunks)
        for fqn, v in doc["values"].items():
            sd_meta[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _ref(v, f"{where}: value {fqn!r}", files)
        planner_data = {k: tuple(p) for k, p in doc.get("planner_data", {}).items()}
        meta = Metadata(state_dict_metadata=sd_meta, planner_data=planner_data, storage_data=storage)
        return CheckpointMetadata(
            dcp=meta,
            files=files,
            world_size=int(doc["world_size"]),
            codec=str(doc.get("codec", "none")),
            versions={str(k): str(v) for k, v in doc.get("versions", {}).items()},
        )
    except CorruptCheckpoint:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: malformed metadata ({e.__class__.__name__}: {e})") from e
