"""Per-rank index files (format 2): where the per-chunk details of one shard live.

Each rank that writes a shard ``rank_NNNNN[...].safetensors`` also writes its index
``index_NNNNN[...].safetensors``: a safetensors container (so ``verify`` and ``copy`` treat it
like any shard: size and xxh3-128 checksums in metadata.json's file table) with one JSON entry,
``{"format": "dist_ckpt.rank_index/1", "shard": NAME, "entries": {ENTRY: [xxh3_64, stored_bytes]}}``.

``metadata.json`` (read by every rank) then only holds what grows with tensors and ranks; a
restoring rank reads the index of each file that holds one of its chunks, once, and nothing
else. The index's size is checked against the file table and a limit from the declared
entry counts before it is read; its bytes against the file checksum after.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import xxhash

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.shard import PendingEntry, ShardReader
from storage_backends import Backend, join_key

INDEX_FORMAT = "dist_ckpt.rank_index/1"
INDEX_ENTRY = "index"
_BASE_BYTES = 64 * 1024
_BYTES_PER_ENTRY = 1024  # an entry name (key path + offsets), a 16-hex checksum, a size


def index_name(shard: str) -> str:
    """``rank_00003-abc.safetensors`` -> ``index_00003-abc.safetensors``."""
    return "index_" + shard.removeprefix("rank_")


def index_entry(shard: str, sums: Mapping[str, str], stored: Mapping[str, int]) -> PendingEntry:
    """The index of one written shard, as the one entry of its index file."""
    doc = {"format": INDEX_FORMAT, "shard": shard, "entries": {name: [sums[name], stored[name]] for name in sums}}
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
        self._loaded: dict[str, dict[str, tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def loaded(self) -> list[str]:
        """The shards whose index has been read so far (what a restoring rank needed)."""
        with self._lock:
            return sorted(self._loaded)

    def entries(self, shard: str) -> dict[str, tuple[str, int]]:
        """``entry -> (checksum, stored bytes)`` of shard file ``shard``."""
        with self._lock:
            if shard not in self._loaded:
                self._loaded[shard] = self._read(shard)
            return self._loaded[shard]

    def _read(self, shard: str) -> dict[str, tuple[str, int]]:
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
            raise CorruptCheckpoint(f"{where}: data checksum mismatch (the index of {shard} is damaged; `dist-ckpt verify`)")
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") != INDEX_FORMAT or doc.get("shard") != shard:
                raise ValueError(f"expected format {INDEX_FORMAT!r} for shard {shard!r}")
            return {str(k): (str(v[0]), int(v[1])) for k, v in doc["entries"].items()}
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CorruptCheckpoint(f"{where}: not a dist_ckpt rank index ({e.__class__.__name__}: {e})") from e
