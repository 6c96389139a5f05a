"""Self-contained copies of shards whose zstd entries reuse chunks of earlier checkpoints.

Such a shard's header names, per reused chunk, the file that holds it
(:mod:`dist_ckpt.format.chunk_refs`). A self-contained copy puts every referenced file in its
own folder under a flat name, so the header is rewritten to those names (bare names: the
shard's own folder); chunk offsets count from each file's data region, so they stay right
whatever the new header's length. The data region is copied as it is, its checksum checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import xxhash

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.format.safetensors_header import META_KEY, header_length
from storage_backends import Backend

_BLOCK = 8 << 20


def _renamed_header(header: bytes, renamed: Mapping[str, str], where: str) -> bytes | None:
    """The header with chunk files renamed, or None when no entry reuses a chunk."""
    try:
        doc = json.loads(header[8:].decode("utf-8"))
        extra = json.loads(doc["__metadata__"][META_KEY])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{where}: unreadable header ({e})") from e
    changed = False
    for info in extra.get("entries", {}).values():
        for row in info.get("chunks", []) if isinstance(info, dict) else []:
            if isinstance(row, list) and len(row) == 4:
                if row[2] not in renamed:
                    raise CorruptCheckpoint(f"{where}: a chunk is in {row[2]!r}, which metadata.json does not list")
                row[2], changed = renamed[row[2]], True
    if not changed:
        return None
    doc["__metadata__"][META_KEY] = json.dumps(extra, separators=(",", ":"))
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def copy_renaming_chunks(
    src: Backend, src_key: str, dst: Backend, dst_key: str, record: FileRecord, renamed: Mapping[str, str]
) -> FileRecord | None:
    """Copy a shard whose header names chunk files, renamed; None (nothing written) if it
    names none (copy it as it is)."""
    where = f"{src.uri}/{src_key}"
    size = src.size(src_key)
    if size != record.size:
        raise CorruptCheckpoint(f"{where}: {size} bytes, metadata.json records {record.size}; not copied")
    hlen = header_length(bytes(src.read(src_key, 0, min(8, size))), where, size)
    new_header = _renamed_header(bytes(src.read(src_key, 0, hlen)), renamed, where)
    if new_header is None:
        return None
    data_hash = xxhash.xxh3_128()
    writer: Any = dst.open_writer(dst_key)
    try:
        writer.write(new_header)
        for pos in range(hlen, size, _BLOCK):
            block = src.read(src_key, pos, min(_BLOCK, size - pos))
            data_hash.update(block)
            writer.write(block)
        if str(record.checksum).split(":")[-1] != data_hash.hexdigest():
            raise CorruptCheckpoint(f"{where}: data checksum mismatch; not copied (`dist-ckpt verify` the source)")
        new_size = writer.commit()
    except BaseException:
        writer.abort()
        raise
    checksum = f"xxh3_128:{xxhash.xxh3_128_hexdigest(new_header)}:{data_hash.hexdigest()}"
    return FileRecord(record.rank, new_size, checksum, record.index)
