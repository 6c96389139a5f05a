"""DCP :class:`Metadata` as JSON (DCP's own ``.metadata`` is a pickle; ours never is).

``metadata.json`` holds the DCP metadata (tensor sizes, dtypes, chunk layout), the file table
(size and checksum of every shard file, which rank wrote it), the world size, the codec, and
torch / format versions. Format 1 also lists every chunk's file, entry and checksum (O(tensors ×
ranks)); format 2 (:mod:`dist_ckpt.format.metadata_v2`, written today) describes regular
shardings by a rule and keeps per-chunk details in per-rank index files. Both are read.

Reading it needs no torch: the command line (``dist-ckpt list/inspect/verify/copy``) starts in
a fraction of the time ``import torch`` takes. :class:`CheckpointMetadata` holds the parsed,
validated records (:mod:`dist_ckpt.format.metadata_records`, re-exported here);
:func:`dist_ckpt.format.dcp_view.dcp_metadata` turns them into DCP's objects for loading.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format import metadata_v2
from dist_ckpt.format.dtypes import check_dtype_name, dtype_name
from dist_ckpt.format.metadata_records import (  # noqa: F401 (re-exported: the records' usual import path)
    CheckpointMetadata,
    ChunkRecord,
    EntryRef,
    FileRecord,
    TensorRecord,
)

if TYPE_CHECKING:  # torch is imported only where DCP objects are built (loading, saving)
    from torch.distributed.checkpoint.metadata import Metadata

FORMAT = "dist_ckpt.checkpoint/1"
MAX_METADATA_BYTES = 256 * 1024 * 1024  # format 1 (no declared counts); format 2: metadata_v2.size_limit


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
