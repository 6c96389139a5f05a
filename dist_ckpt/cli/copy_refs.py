"""``dist-ckpt copy`` of an incremental checkpoint (one whose file table lists files of earlier
checkpoints, :mod:`dist_ckpt.references`).

- **Self-contained (default).** Each referenced file is copied *into* the new checkpoint's own
  folder under a flat name (``ref-step_000000003-rank_00000.safetensors``); the rank index files,
  whose entries name the file holding their bytes, are rewritten to the new names; metadata.json's
  file table and ``COMMITTED`` (no ``base``; own bytes = logical bytes) follow. The copy reads
  nothing outside its folder: it can be moved, shared or deleted on its own.
- **``--keep-references``.** The referenced files are copied to the same run-root-relative
  paths at the destination (skipped where an identical file, same size and checksums, is
  already there), and the checkpoint is copied as it is: dedup is kept at the destination.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from dist_ckpt.cli.copy_chunks import copy_renaming_chunks
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.format.rank_index import INDEX_ENTRY, INDEX_FORMATS
from dist_ckpt.format.shard import PendingEntry, ShardReader, save_shard
from dist_ckpt.layout import COMMITTED
from dist_ckpt.references import file_key, is_reference
from dist_ckpt.verify import verify_file
from storage_backends import Backend, join_key

CopyObject = Callable[[Backend, str, Backend, str, FileRecord], None]


def flat_name(reference: str) -> str:
    """The own-folder name a referenced file gets in a self-contained copy."""
    return "ref-" + reference.replace("/", "-")


@dataclass(frozen=True)
class Rewritten:
    """What a self-contained copy changes: the file table, metadata.json, COMMITTED."""

    files: dict[str, FileRecord]
    metadata: bytes
    committed: bytes


def copy_self_contained(
    src: Backend,
    src_prefix: str,
    dst: Backend,
    staging: str,
    files: dict[str, FileRecord],
    metadata: bytes,
    committed: bytes,
    copy_object: CopyObject,
    written: list[str],
) -> Rewritten:
    """Copy every file of the checkpoint into ``staging``: own files as they are, referenced
    ones under flat names, rank indexes rewritten. ``written`` collects the keys written."""
    renamed = {n: flat_name(n) for n in files if is_reference(n)}
    new_files: dict[str, FileRecord] = {}
    indexes = {r.index for r in files.values() if r.index}
    for name, record in sorted(files.items()):
        if name in indexes:
            continue
        target = renamed.get(name, name)
        key = join_key(staging, target)
        written.append(key)
        rewritten = copy_renaming_chunks(src, file_key(src_prefix, name), dst, key, record, renamed)
        if rewritten is not None:  # zstd chunks reused from other files: header names them anew
            new_files[target] = rewritten
            continue
        copy_object(src, file_key(src_prefix, name), dst, key, record)
        new_files[target] = FileRecord(record.rank, record.size, record.checksum, record.index)
    for name in sorted(indexes):
        record = files[name]
        reader = ShardReader(src, join_key(src_prefix, name), record.size)
        problem = verify_file(src, join_key(src_prefix, name), record)
        if problem is not None:
            from dist_ckpt.errors import CorruptCheckpoint

            raise CorruptCheckpoint(f"{problem.message}; not copied (`dist-ckpt verify` the source)")
        doc = json.loads(bytes(reader.read(INDEX_ENTRY)).decode("utf-8"))
        assert doc.get("format") in INDEX_FORMATS  # checked by its checksum against the file table above
        for entry in doc["entries"].values():
            if len(entry) > 3 and entry[3] in renamed:
                entry[3] = renamed[entry[3]]
            for chunk in entry[4] if len(entry) > 4 else ():  # zstd chunk records
                chunk[1] = renamed.get(chunk[1], chunk[1])
        data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        key = join_key(staging, name)
        written.append(key)
        out = save_shard(dst, key, [PendingEntry(INDEX_ENTRY, "U8", (len(data),), memoryview(data), "json")], None)
        new_files[name] = FileRecord(record.rank, out.size, out.checksum)
    meta_doc = json.loads(metadata.decode("utf-8"))  # key order kept: "format", "counts" first
    table = {}
    for name, record in sorted(new_files.items()):
        table[name] = {
            "rank": record.rank,
            "size": record.size,
            "checksum": record.checksum,
            **({"index": record.index} if record.index else {}),
        }
    meta_doc["files"] = table
    record = CommitRecord.from_json(committed, f"{src.uri}/{src_prefix}/{COMMITTED}")
    record = record.self_contained(sum(r.size for r in new_files.values()))
    return Rewritten(new_files, json.dumps(meta_doc, separators=(",", ":")).encode("utf-8"), record.to_json())


def copy_referenced_files(
    src: Backend, src_prefix: str, dst: Backend, dst_prefix: str, files: dict[str, FileRecord], copy_object: CopyObject
) -> None:
    """``--keep-references``: the referenced files at the same run-root-relative paths."""
    for name, record in sorted(files.items()):
        if not is_reference(name):
            continue
        key = file_key(dst_prefix, name)
        if dst.exists(key) and verify_file(dst, key, record) is None:
            continue  # already there (e.g. copied with an earlier checkpoint of the run)
        copy_object(src, file_key(src_prefix, name), dst, key, record)
