"""metadata.json format 2: O(tensors + ranks), whatever the world size.

The document opens with its declared counts, so a reader sizes its limit before reading the
rest (a file bigger than its counts allow is refused unread)::

    {"format":"dist_ckpt.checkpoint/2","counts":{"ranks":R,"files":F,"tensors":T,"values":V,"listed_chunks":C},
     "world_size":R,"codec":..,"versions":{..},
     "files":{NAME:{"rank":r,"size":n,"checksum":"xxh3_128:..:..","index":"index_NNNNN.safetensors"},..},
     "tensors":{FQN:{"dtype":..,"size":[..], LAYOUT},..},
     "values":{FQN:{"file":..,"entry":..,"checksum":..,"stored_bytes":n},..},
     "planner_data":{..}}

LAYOUT is one of ``"on"``, ``"split"`` or ``"chunks"`` (:mod:`dist_ckpt.format.chunk_layout`).
Chunk entry names follow from key and offsets; checksums and stored sizes of tensor chunks are in
the per-rank index files (:mod:`dist_ckpt.format.rank_index`), listed in the file table with
their own size and checksum. Values (few, small) keep their full reference here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.chunk_layout import Layout, Placed, entry_name, layout_json, parse_layout
from dist_ckpt.format.dtypes import check_dtype_name, dtype_name
from dist_ckpt.format.metadata_records import (
    CheckpointMetadata,
    ChunkRecord,
    EntryRef,
    FileRecord,
    TensorRecord,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

FORMAT = "dist_ckpt.checkpoint/2"
_PROLOGUE = re.compile(
    rb'^\s*\{\s*"format"\s*:\s*"dist_ckpt\.checkpoint/2"\s*,\s*"counts"\s*:\s*\{\s*'
    + rb"\s*,\s*".join(
        rb'"%s"\s*:\s*(\d{1,12})' % k for k in (b"ranks", b"files", b"tensors", b"values", b"listed_chunks")
    )
    + rb"\s*\}"
)
# Generous per-item budgets (a key path of a few hundred characters, a 6-d size, a checksum);
# the limit only has to refuse a file far bigger than its declared content.
_BASE = 1 << 20
_PER_FILE = 1024
_PER_TENSOR = 4096
_PER_VALUE = 4096
_PER_LISTED_CHUNK = 512


def size_limit(prologue: bytes) -> int | None:
    """The byte limit a format-2 metadata.json's declared counts allow; None if not format 2."""
    m = _PROLOGUE.match(prologue)
    if m is None:
        return None
    _ranks, files, tensors, values, listed = (int(g) for g in m.groups())
    return _BASE + _PER_FILE * files + _PER_TENSOR * tensors + _PER_VALUE * values + _PER_LISTED_CHUNK * listed


def dumps(
    meta: Metadata,
    chunk_ranks: Mapping[tuple[str, Sequence[int]], int],
    values: Mapping[str, EntryRef],
    files: Mapping[str, FileRecord],
    world_size: int,
    codec: str,
    versions: dict[str, str],
) -> bytes:
    """Format-2 metadata.json. ``chunk_ranks``: the rank that stored each ``(fqn, offsets)``
    (offsets as DCP gives them: a ``torch.Size`` hashes and compares as the tuple)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors: dict[str, Any] = {}
    listed = 0
    for fqn, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = tuple(md.size)
        # Empty chunks (a rank past the end of a torch.chunk split) hold no bytes and are never
        # read: leaving them out keeps the split a rule whichever rank DCP's de-duplication
        # gave them to (they share one offset, so DCP keeps one of them, on any rank).
        rule = getattr(md.chunks, "rule", None)  # compact_plan.RuledChunks: the rule, no scan
        if rule is not None:
            layout = (
                {"on": rule.first_rank}
                if rule.count == 1
                else {"split": [rule.dim, rule.first_rank, rule.count, rule.chunk]}
            )
        else:
            chunks = [c for c in md.chunks if all(c.sizes)] or list(md.chunks[:1])
            offsets = [c.offsets for c in chunks]
            layout = layout_json(size, offsets, [c.sizes for c in chunks], [chunk_ranks[fqn, o] for o in offsets])
        listed += len(layout.get("chunks", ()))
        tensors[fqn] = {"dtype": dtype_name(md.properties.dtype), "size": list(size), **layout}
    value_json = {
        fqn: {"file": r.file, "entry": r.entry, "checksum": r.checksum, "stored_bytes": r.stored_bytes}
        for fqn, r in values.items()
    }
    file_json = {}
    for name, r in sorted(files.items()):
        file_json[name] = {
            "rank": r.rank,
            "size": r.size,
            "checksum": r.checksum,
            **({"index": r.index} if r.index else {}),
        }
    counts = {
        "ranks": world_size,
        "files": len(files),
        "tensors": len(tensors),
        "values": len(values),
        "listed_chunks": listed,
    }
    doc = {
        "format": FORMAT,
        "counts": counts,
        "world_size": world_size,
        "codec": codec,
        "versions": versions,
        "files": file_json,
        "tensors": tensors,
        "values": value_json,
        "planner_data": {k: list(v) for k, v in (meta.planner_data or {}).items()},
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


class _Chunks(Sequence[ChunkRecord]):
    """A tensor's :class:`ChunkRecord` s, built on access from its :class:`Layout`."""

    def __init__(self, fqn: str, layout: Layout, rank_files: Mapping[int, str], where: str):
        self.fqn, self.layout, self.rank_files, self.where = fqn, layout, rank_files, where

    def _record(self, c: Placed) -> ChunkRecord:
        file = self.rank_files.get(c.rank)
        if file is None:
            raise CorruptCheckpoint(
                f"{self.where}: tensor {self.fqn!r} has a chunk on rank {c.rank}, which wrote no file"
            )
        return ChunkRecord(c.offsets, c.sizes, EntryRef(file, entry_name(self.fqn, c.offsets), "", -1))

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._record(c) for c in self.layout[i]]
        return self._record(self.layout[i])

    def __iter__(self) -> Iterator[ChunkRecord]:
        return (self._record(c) for c in self.layout)


def parse(doc: dict[str, Any], where: str, prologue: bytes) -> CheckpointMetadata:
    """A parsed format-2 document; :class:`CorruptCheckpoint` naming ``where`` if malformed."""
    if size_limit(prologue) is None:
        raise CorruptCheckpoint(
            f"{where}: a format-2 metadata.json must open with its declared counts "
            '({"format": ..., "counts": {"ranks", "files", "tensors", "values", "listed_chunks"}}); '
            "the file is damaged or was rewritten"
        )
    try:
        from storage_backends.base import validate_key

        world_size = int(doc["world_size"])
        files: dict[str, FileRecord] = {}
        rank_files: dict[int, str] = {}
        for name, rec in doc["files"].items():
            validate_key(name)
            index = rec.get("index")
            if "/" in name:
                # an incremental checkpoint's referenced file: '<checkpoint folder>/<file>'
                # relative to the run root (dist_ckpt.references), never with an index
                from dist_ckpt.references import check_reference

                check_reference(name, where)
                if index:
                    raise ValueError(f"referenced file {name!r} must not carry an index")
            files[name] = FileRecord(
                int(rec["rank"]), int(rec["size"]), str(rec["checksum"]), str(index) if index else None
            )
            if index:
                rank_files[files[name].rank] = name
        for name, rec in files.items():
            if rec.index is not None and rec.index not in files:
                raise ValueError(f"file {name!r}: its index {rec.index!r} is not in the file table")
        tensors: dict[str, TensorRecord] = {}
        listed = 0
        for fqn, t in doc["tensors"].items():
            tw = f"{where}: tensor {fqn!r}"
            size = t["size"]
            if not isinstance(size, list) or not all(type(v) is int and v >= 0 for v in size):
                raise ValueError(f"{tw}: size must be a list of non-negative integers")
            layout = parse_layout(t, tuple(size), world_size, tw)
            if layout.rule is not None and layout.rule.count > len(rank_files):
                # each chunk of a rule is on its own rank, and each such rank wrote a shard
                raise ValueError(f"{tw}: a split over {layout.rule.count} ranks, but only {len(rank_files)} shards")
            listed += layout.listed_count if "chunks" in t else 0
            tensors[str(fqn)] = TensorRecord(
                check_dtype_name(t["dtype"], tw), tuple(size), _Chunks(fqn, layout, rank_files, where)
            )
        values = {}
        for fqn, v in doc["values"].items():
            ref = EntryRef(str(v["file"]), str(v["entry"]), str(v["checksum"]), int(v["stored_bytes"]))
            if ref.file not in files or not ref.checksum:
                raise ValueError(f"value {fqn!r}: file {ref.file!r} not in the file table, or no checksum")
            values[str(fqn)] = ref
        counts = doc["counts"]
        found = {
            "ranks": world_size,
            "files": len(files),
            "tensors": len(tensors),
            "values": len(values),
            "listed_chunks": listed,
        }
        if counts != found:
            raise ValueError(f"declared counts {counts} do not match the content {found}")
        return CheckpointMetadata(
            tensors=tensors,
            values=values,
            planner_data={k: tuple(p) for k, p in doc.get("planner_data", {}).items()},
            files=files,
            world_size=world_size,
            codec=str(doc.get("codec", "none")),
            versions={str(k): str(v) for k, v in doc.get("versions", {}).items()},
            format_version=2,
        )
    except CorruptCheckpoint:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: malformed metadata ({e.__class__.__name__}: {e})") from e
