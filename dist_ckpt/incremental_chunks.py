"""Chunk-level reuse for the zstd codec: in an entry that changed, the chunks that did not are
not written again (:mod:`dist_ckpt.incremental` decides per entry first).

An entry of more than one chunk records, in its rank-index row, each chunk's content (a sample
hash, and the full xxh3-128 where computed) and where its stored bytes are: the shard itself
(file ``""``) or an earlier checkpoint's shard (run-root-relative path, data-region offset).
At the next save a chunk is reused when the base entry has the same chunk boundaries and the
chunk's full hash equals the base chunk's: the sample first, the full hash only where the
sample matches (a chunk whose sample differs has certainly changed). A base chunk recorded
with its sample only (it had changed at the base's save) is read back and hashed, once. The
new shard header lists the reused chunk by file and offset (:mod:`dist_ckpt.format.chunk_refs`):
always the file that holds the bytes, never a chain through the base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import xxhash

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.chunk_refs import ChunkRef
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.format.rank_index import IndexEntry
from dist_ckpt.format.shard import PendingEntry
from storage_backends import BackendError

log = logging.getLogger(__name__)

_SAMPLE = 16 << 10
ChunkRecord = tuple[str, str, int, int, int]  # content "sample:full", file, offset, stored_len, raw_len
ReadChunk = Callable[[ChunkRecord, str], bytes]  # a base chunk's raw bytes (record, dtype)


def _full(piece: memoryview | bytes, dtype: str) -> str:
    """xxh3-128 of a chunk's dtype and raw bytes (a chunk's encoding depends on its dtype)."""
    h = xxhash.xxh3_128(f"{dtype}|".encode())
    h.update(piece)
    return h.hexdigest()


def _sample(piece: memoryview, dtype: str) -> str:
    """xxh3-128 of dtype, three 16 KiB slices of a chunk and its length (equal for equal chunks)."""
    h, n = xxhash.xxh3_128(f"{dtype}|".encode()), len(piece)
    if n <= 4 * _SAMPLE:
        h.update(piece)
    else:
        for start in (0, n // 2 - _SAMPLE // 2, n - _SAMPLE):
            h.update(piece[start : start + _SAMPLE])
    h.update(str(n).encode())
    return h.hexdigest()


def _split(content: str) -> tuple[str, str | None]:
    sample, _, full = content.partition(":")
    return sample, full or None


@dataclass(frozen=True)
class ChunkPlan:
    """One entry's chunks after matching: which are reused, and their index records (written
    chunks get their file ``""`` and offset once written: :func:`finish_records`)."""

    reuse: tuple[ChunkRef | None, ...]
    records: tuple[ChunkRecord, ...]
    files: Mapping[str, FileRecord]  # the files reused chunks are in


def plan_chunks(
    entry: PendingEntry,
    step: int,
    found: IndexEntry | None,
    base_files: Mapping[str, FileRecord],
    read_chunk: ReadChunk | None,
) -> ChunkPlan | None:
    """The chunk plan of ``entry`` (cut every ``step`` bytes), or None for a one-chunk entry."""
    data = entry.data.cast("B") if entry.data.format != "B" or entry.data.ndim != 1 else entry.data
    n = len(data)
    if n <= step:
        return None
    raw_lens = [min(step, n - o) for o in range(0, n, step)]
    base = found.chunks if found is not None and found.chunks else None
    if base is not None and [c[4] for c in base] != raw_lens:
        base = None  # other chunk boundaries (another chunk size): nothing to compare
    reuse: list[ChunkRef | None] = []
    records: list[ChunkRecord] = []
    files: dict[str, FileRecord] = {}
    for i, raw in enumerate(raw_lens):
        piece = data[i * step : i * step + raw]
        sample = _sample(piece, entry.dtype)
        b = base[i] if base is not None else None
        full = ""
        if b is None:
            full = _full(piece, entry.dtype)  # nothing to compare yet: the next save will
        else:
            base_sample, base_full = _split(b[0])
            if base_sample == sample:
                full = _full(piece, entry.dtype)
                if base_full is None and read_chunk is not None:
                    base_full = _stored_hash(b, entry, read_chunk)
                if full == base_full and b[1] in base_files:
                    reuse.append(ChunkRef(b[1], b[2], b[3], raw))
                    records.append((f"{sample}:{full}", *b[1:]))
                    files[b[1]] = base_files[b[1]]
                    continue
        reuse.append(None)
        records.append((f"{sample}:{full}", "", -1, -1, raw))
    return ChunkPlan(tuple(reuse), tuple(records), files)


def _stored_hash(b: ChunkRecord, entry: PendingEntry, read_chunk: ReadChunk) -> str | None:
    try:
        return _full(read_chunk(b, entry.dtype), entry.dtype)
    except (CorruptCheckpoint, BackendError) as e:
        log.warning("%s: cannot read back a chunk of %r to compare (%s): writing it again", b[1], entry.name, e)
        return None


def finish_records(records: tuple[ChunkRecord, ...], written: list[tuple[int | None, int]]) -> tuple[ChunkRecord, ...]:
    """The index records of an entry's chunks once written: own chunks get their offset and
    stored length in the shard (``written``: per chunk, as ``WrittenShard.chunk_offsets``)."""
    if len(written) != len(records):
        raise CorruptCheckpoint(f"wrote {len(written)} chunks of an entry planned as {len(records)}")
    return tuple(r if r[1] else (r[0], "", w[0] or 0, w[1], r[4]) for r, w in zip(records, written))


def chunk_steps(codec: object) -> Callable[[PendingEntry], int | None] | None:
    """Raw bytes per chunk of an entry the codec compresses (None: none is chunked)."""
    from dist_ckpt.format.shard import SMALL_ENTRY_BYTES

    step = getattr(codec, "step", None)
    if codec is None or step is None:
        return None

    def of(e: PendingEntry) -> int | None:
        return step(e.dtype) if e.kind == "tensor" and e.data.nbytes >= SMALL_ENTRY_BYTES else None

    return of
