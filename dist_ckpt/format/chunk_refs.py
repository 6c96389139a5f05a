"""Chunk references: a zstd entry whose chunks are partly stored in an earlier checkpoint's shard.

An incremental save (:mod:`dist_ckpt.incremental_chunks`) does not write again a chunk whose
content equals the same chunk of the base's entry. The shard header's chunk table then lists,
per chunk, either ``[raw_len, stored_len]`` (stored here: own chunks follow each other in the
entry's data range, in order) or ``[raw_len, stored_len, file, offset]``: the chunk's stored
bytes are ``stored_len`` bytes at ``offset`` of the *data region* (after the header) of
``file`` — ``<checkpoint folder>/<file>`` relative to the run root, or a bare name in this
shard's own folder (a self-contained copy). Data-region offsets survive a copy that rewrites a
header. Readers older than this format refuse a 4-item chunk-table row ("chunk table is not a
list of [raw_len, stored_len] pairs", naming the file): they never read wrong bytes.

Each stored chunk checks itself (xxh3-64 trailer, zstd frame checksums: ``zstd_chunk``), so a
damaged referenced chunk fails by the referenced file's name; the entry checksum covers the
bytes stored in this shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.safetensors_header import header_length


@dataclass(frozen=True)
class ChunkRef:
    """A chunk not written again: where its stored bytes are (file as in the header)."""

    file: str
    offset: int  # in the file's data region
    stored: int
    raw: int


def ref_key(shard_key: str, file: str) -> str:
    """The backend key of chunk file ``file`` named in the shard at ``shard_key``."""
    folder = shard_key.rsplit("/", 1)[0] if "/" in shard_key else ""
    if "/" not in file:
        return f"{folder}/{file}" if folder else file
    root = folder.rsplit("/", 1)[0] if "/" in folder else ""
    return f"{root}/{file}" if root else file


def read_pieces(reader: Any, info: Any, first: int, last: int, checksum: str | None) -> list[tuple[str, memoryview]]:
    """The stored bytes of chunks ``[first, last)`` of ``info`` (a ShardReader's entry), each
    with the file it came from: own chunks in one ranged read (checked against ``checksum``
    when given: a whole-entry read), each run of referenced chunks in one more."""
    refs = info.refs
    own_begin = info.begin + sum(s for (_, s), r in zip(info.chunks[:first], refs) if r is None)
    own_lens = [s for (_, s), r in zip(info.chunks[first:last], refs[first:last]) if r is None]
    own = reader.backend.read(reader.key, own_begin, sum(own_lens)) if own_lens else b""
    if len(own) != sum(own_lens):
        raise CorruptCheckpoint(f"{reader.header.file}, entry {info.name!r}: short read (truncated file)")
    if checksum is not None:
        reader.check(info, own, checksum)
    out: list[tuple[str, memoryview]] = []
    own_view, pos, i = memoryview(own), 0, first
    while i < last:
        ref = refs[i]
        if ref is None:
            n = info.chunks[i][1]
            out.append((reader.header.file, own_view[pos : pos + n]))
            pos, i = pos + n, i + 1
            continue
        j, end = i, ref[1]  # a run of chunks lying back to back in one referenced file
        while j < last and refs[j] is not None and refs[j][0] == ref[0] and refs[j][1] == end:
            end += info.chunks[j][1]
            j += 1
        key = ref_key(reader.key, ref[0])
        where = f"{reader.backend.uri}/{key}"
        listed = getattr(reader, "files", None)  # the checkpoint's file table, where the caller has it
        if listed is not None and ref[0] not in listed:
            raise CorruptCheckpoint(
                f"a chunk of entry {info.name!r} is in {ref[0]!r}, which metadata.json does not list"
            )
        start = _data_start(reader, key, where, listed[ref[0]].size if listed is not None else None)
        blob = memoryview(reader.backend.read(key, start + ref[1], end - ref[1]))
        if len(blob) != end - ref[1]:
            raise CorruptCheckpoint(f"{where}: short read of chunks of entry {info.name!r} (truncated file)")
        p = 0
        for k in range(i, j):
            out.append((where, blob[p : p + info.chunks[k][1]]))
            p += info.chunks[k][1]
        i = j
    return out


def _data_start(reader: Any, key: str, where: str, expected_size: int | None) -> int:
    """Where the data region of the referenced file ``key`` starts (its header length), once
    its size is checked against metadata.json's file table."""
    cache = reader.__dict__.setdefault("_ref_starts", {})
    if key not in cache:
        size = reader.backend.size(key)
        if expected_size is not None and size != expected_size:
            raise CorruptCheckpoint(
                f"{where}: file is {size} bytes but metadata.json records {expected_size} (truncated or replaced)"
            )
        cache[key] = header_length(bytes(reader.backend.read(key, 0, min(size, 8))), where, size)
    return cache[key]


def decode_pieces(
    codec: Any,
    pieces: Sequence[tuple[str, memoryview]],
    raw_lens: Sequence[int],
    dtype: str,
    out: memoryview,
    first: int,
) -> None:
    """Decode chunks ``first, first + 1, ...`` into ``out``, one run per file, so an error names
    the file that holds the damaged chunk."""
    pos, index = 0, first
    for where, group in itertools.groupby(pieces, key=lambda p: p[0]):
        stored = [p[1] for p in group]
        lens = list(raw_lens[index - first : index - first + len(stored)])
        try:
            codec.decode_into(stored, lens, dtype, out[pos : pos + sum(lens)], first_index=index)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where}: {e}") from e
        pos, index = pos + sum(lens), index + len(stored)
