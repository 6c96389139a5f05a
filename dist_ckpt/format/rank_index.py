"""Per-rank index files (format 2): where the per-chunk details of one shard live.

Each rank that writes a shard ``rank_NNNNN[...].safetensors`` also writes its index
``index_NNNNN[...].safetensors``: a safetensors container (so ``verify`` and ``copy`` treat it
like any shard: size and xxh3-128 checksums in metadata.json's file table) with one JSON entry,
``{"format": "dist_ckpt.rank_index/1", "shard": NAME, "entries": {ENTRY: [xxh3_64, stored_bytes, ...]}}``.
Incremental checkpoints (:mod:`dist_ckpt.incremental`) add a third item, the entry's content
hash, and for an entry not written again a fourth: the run-root-relative path of the file of
an earlier checkpoint that holds its bytes (listed in metadata.json's file table too). A zstd
entry of several chunks adds a fifth, its chunks' hashes and places
(:mod:`dist_ckpt.incremental_chunks`); such an index is written as format ``rank_index/2``,
which older readers refuse by name.

``metadata.json`` (read by every rank) then only holds what grows with tensors and ranks; a
restoring rank reads the index of each file that holds one of its chunks, once, and nothing
else. The index's size is checked against the file table and a limit from the declared
entry counts before it is read; its bytes against the file checksum after.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.shard import PendingEntry, ShardReader
from storage_backends import Backend, join_key

INDEX_FORMAT = "dist_ckpt.rank_index/1"
# written when an entry records per-chunk hashes (zstd chunk reuse, dist_ckpt.incremental_chunks):
# readers of format /1 only refuse it by name instead of misreading it
INDEX_FORMAT_CHUNKS = "dist_ckpt.rank_index/2"
INDEX_FORMATS = (INDEX_FORMAT, INDEX_FORMAT_CHUNKS)
INDEX_ENTRY = "index"
_BASE_BYTES = 64 * 1024
_BYTES_PER_ENTRY = 1024  # an entry name (key path + offsets), a 16-hex checksum, a size


@dataclass(frozen=True)
class IndexEntry:
    """One entry of a rank index: checksum and stored size of its stored bytes; the content
    hash (incremental saves); ``location``: the referenced file holding the bytes, or None
    when they are in the shard itself."""

    checksum: str
    stored_bytes: int
    content: str | None = None
    location: str | None = None
    # zstd entries of incremental saves: per chunk (content record, file, data-region offset,
    # stored_len, raw_len); file "" = the shard of this index (dist_ckpt.incremental_chunks)
    chunks: tuple[tuple[str, str, int, int, int], ...] | None = None

    def __getitem__(self, i: int) -> Any:  # (checksum, stored_bytes) as format-2 code reads it
        return (self.checksum, self.stored_bytes)[i]

    def json(self) -> list[Any]:
        out: list[Any] = [self.checksum, self.stored_bytes]
        if self.content is not None or self.location is not None or self.chunks is not None:
            out.append(self.content or "")
        if self.location is not None or self.chunks is not None:
            out.append(self.location or "")
        if self.chunks is not None:
            out.append([list(c) for c in self.chunks])
        return out


def index_name(shard: str) -> str:
    """``rank_00003-abc.safetensors`` -> ``index_00003-abc.safetensors``."""
    return "index_" + shard.removeprefix("rank_")


def index_entry(
    shard: str,
    sums: Mapping[str, str],
    stored: Mapping[str, int],
    extra: Mapping[str, IndexEntry] | None = None,
) -> PendingEntry:
    """The index of one written shard, as the one entry of its index file. ``extra``: entries
    with a content hash, or not written again (their bytes are in a referenced file)."""
    entries: dict[str, list[Any]] = {name: [sums[name], stored[name]] for name in sums}
    for name, e in (extra or {}).items():
        entries[name] = e.json()
    chunked = any(e.chunks is not None for e in (extra or {}).values())
    doc = {"format": INDEX_FORMAT_CHUNKS if chunked else INDEX_FORMAT, "shard": shard, "entries": entries}
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    return PendingEntry(INDEX_ENTRY, "U8", (len(data),), memoryview(data), "json")


def index_size_limit(max_entries: int) -> int:
    """Largest index file a shard of at most ``max_entries`` entries can have."""
    return _BASE_BYTES + _BYTES_PER_ENTRY * max_entries


class RankIndexes:
    """Reads per-rank indexes on demand (each at most once; thread-safe)."""

    def __init__(self, backend: Backend, prefix: str, files: Mapping[str, Any], max_entries: int):
        self.backend, self.prefix, self.files = backend, prefix, files
        self.limit = index_size_limit(max_entries)
        self._loaded: dict[str, dict[str, IndexEntry]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def loaded(self) -> list[str]:
        """The shards whose index has been read so far (what a restoring rank needed)."""
        with self._lock:
            return sorted(self._loaded)

    def entries(self, shard: str) -> dict[str, IndexEntry]:
        """``entry -> IndexEntry`` (checksum, stored bytes, ...) of shard file ``shard``."""
        with self._lock:
            if shard not in self._loaded:
                self._loaded[shard] = self._read(shard)
            return self._loaded[shard]

    def _read(self, shard: str) -> dict[str, IndexEntry]:
        uri = f"{self.backend.uri}/{self.prefix}"
        record = self.files.get(shard)
        name = getattr(record, "index", None)
        if not name or name not in self.files:
            raise CorruptCheckpoint(f"{uri}/metadata.json: shard {shard!r} has no index file in the file table")
        index = self.files[name]
        where = f"{uri}/{name}"
        if index.size > self.limit:
            raise CorruptCheckpoint(
                f"{where}: metadata.json records {index.size} bytes, over the {self.limit}-byte limit for "
                "the declared tensor count; the file table is damaged or was replaced"
            )
        reader = ShardReader(self.backend, join_key(self.prefix, name), index.size)
        data = bytes(reader.read(INDEX_ENTRY))
        self.bytes_read += index.size
        parts = str(index.checksum).split(":")
        if len(parts) != 3 or xxhash.xxh3_128_hexdigest(data) != parts[2]:
            raise CorruptCheckpoint(
                f"{where}: data checksum mismatch (the index of {shard} is damaged; `dist-ckpt verify`)"
            )
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") not in INDEX_FORMATS or doc.get("shard") != shard:
                raise ValueError(f"expected format {INDEX_FORMAT!r} for shard {shard!r}")
            entries = {str(k): _parse_entry(v) for k, v in doc["entries"].items()}
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CorruptCheckpoint(f"{where}: not a dist_ckpt rank index ({e.__class__.__name__}: {e})") from e
        for name, e in entries.items():
            if e.location is not None and e.location not in self.files:
                # a referenced file must be listed (size, checksum) in metadata.json's file table
                raise CorruptCheckpoint(
                    f"{where}: entry {name!r} refers to {e.location!r}, which metadata.json does not list"
                )
            for c in e.chunks or ():
                if c[1] and c[1] not in self.files:
                    raise CorruptCheckpoint(
                        f"{where}: a chunk of entry {name!r} is in {c[1]!r}, which metadata.json does not list"
                    )
        return entries


def _parse_entry(v: Any) -> IndexEntry:
    if not isinstance(v, list) or not 2 <= len(v) <= 5:
        raise ValueError(f"expected [checksum, stored_bytes(, content(, file(, chunks)))], found {v!r:.80}")
    content = str(v[2]) if len(v) > 2 and v[2] else None
    location = str(v[3]) if len(v) > 3 and v[3] else None
    chunks = None
    if len(v) > 4:
        from dist_ckpt.references import check_reference

        chunks = tuple((str(c[0]), str(c[1]), int(c[2]), int(c[3]), int(c[4])) for c in v[4])
        for c in chunks:
            if "/" in c[1]:  # no "/": an own file ("": this index's shard; else a self-contained copy)
                check_reference(c[1])
    if location is not None and "/" in location:  # no "/": an own file (a self-contained copy)
        from dist_ckpt.references import check_reference

        check_reference(location)
    return IndexEntry(str(v[0]), int(v[1]), content, location, chunks)
