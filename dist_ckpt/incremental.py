"""Incremental saves: an entry whose content is already stored in the base checkpoint is not
written again; the new checkpoint refers to the file that holds its bytes.

- **Base.** The coordinator picks it once per save (``prepare_global_plan``): the checkpoint
  named by ``dist_ckpt.save(..., base=...)``, or, for a manager with ``incremental=True``, the
  newest committed step of the run root below the one being saved. A base that is not
  committed (deleted, never finished) gives a full save.
- **Matching.** Each rank reads the base's metadata.json and the rank index of the base's shard
  written by the same rank (the same rank writes the same entries when the world size is
  unchanged; after a world-size change names rarely match and the save is simply fuller). An
  entry is reused when its name and content hash (xxh3-128 over dtype, shape and raw bytes)
  equal the base entry's. Reused entries point straight at the file that holds the bytes
  (never a chain through the base), so deleting a step never needs to rewrite another. When
  this process wrote the base itself (the base's ``COMMITTED``, read at every save, names the
  same save attempt), its entries are not read back (:mod:`dist_ckpt.known_commits`).
- **zstd chunks.** In an entry that is written again, the chunks equal to the base entry's
  are not (:mod:`dist_ckpt.incremental_chunks`).
- **Hashing.** A sample hash first; the full hash only where the sample matches the base's (a
  possible reuse) or there is no base entry — see :func:`split_entries`.
- **Where hashing runs.** In ``write_data``, i.e. on the staged copy in the background worker of
  an async save (thread or writer process): it never lengthens the training stall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

import xxhash

from dist_ckpt import known_commits
from dist_ckpt.checkpoint_files import COMMITTED, read_checkpoint_metadata
from dist_ckpt.errors import CheckpointNotFound, CorruptCheckpoint
from dist_ckpt.format.metadata_json import FileRecord
from dist_ckpt.format.rank_index import IndexEntry
from dist_ckpt.format.shard import PendingEntry, ShardReader
from dist_ckpt.incremental_chunks import ChunkPlan, ChunkRecord, ReadChunk, plan_chunks
from dist_ckpt.layout import STEP_PREFIX
from dist_ckpt.references import check_reference, file_key, is_reference, run_parent
from storage_backends import Backend, BackendError, ObjectNotFound, join_key

log = logging.getLogger(__name__)

_HASH_PIECE = 2 << 20
_SAMPLE = 16 << 10
T = TypeVar("T")
_STEP_PREFIX = STEP_PREFIX  # the folder-name prefix of every step (dist_ckpt.layout)


def content_hash(entry: PendingEntry) -> str:
    """xxh3-128 of an entry's dtype, shape and raw bytes (what must be equal to reuse it)."""
    h = xxhash.xxh3_128(f"{entry.dtype}|{','.join(map(str, entry.shape))}|".encode())
    data = entry.data.cast("B") if entry.data.format != "B" or entry.data.ndim != 1 else entry.data
    for pos in range(0, len(data), _HASH_PIECE):
        h.update(data[pos : pos + _HASH_PIECE])
    return "xxh3_128:" + h.hexdigest()


def choose_base(backend: Backend, prefix: str, requested: str | bool | None) -> str | None:
    """The folder name (in the run root of ``prefix``) of the base checkpoint, or None for a
    full save. ``requested``: a folder name, True (the newest committed ``step_*`` folder
    below this one), or None/False/"" (no base)."""
    if not requested:
        return None
    parent, own = run_parent(prefix), prefix.strip("/").rsplit("/", 1)[-1]
    try:
        if isinstance(requested, str):
            found = requested if backend.exists(join_key(parent, requested, COMMITTED)) else None
            if found is None:
                log.info("base %s of %s is not committed: saving in full", requested, prefix)
            return found
        steps = []
        for obj in backend.list(join_key(parent, _STEP_PREFIX)):
            folder, _, rest = obj.key[len(parent) + 1 if parent else 0 :].partition("/")
            if rest == COMMITTED and folder != own and folder[len(_STEP_PREFIX) :].isdigit():
                steps.append(folder)
    except BackendError as e:
        raise CorruptCheckpoint(f"{backend.uri}/{parent}: cannot list the run's committed steps ({e})") from e
    own_step = own[len(_STEP_PREFIX) :]
    older = [s for s in steps if not own_step.isdigit() or int(s[len(_STEP_PREFIX) :]) < int(own_step)]
    return max(older, key=lambda s: int(s[len(_STEP_PREFIX) :])) if older else None


def base_attempt(backend: Backend, prefix: str, base: str | None) -> tuple[str | None, str | None]:
    """``(base, attempt)``: the base folder if it is still committed (its ``COMMITTED`` is read
    now, at every save) and the save attempt its marker names (None: an older marker)."""
    if base is None:
        return None, None
    try:
        marker = backend.read(join_key(run_parent(prefix), base, COMMITTED))
    except ObjectNotFound:
        log.info("base %s of %s is no longer committed: saving in full", base, prefix)
        return None, None
    except BackendError as e:
        raise CorruptCheckpoint(f"{backend.uri}/{run_parent(prefix)}/{base}: cannot read {COMMITTED} ({e})") from e
    return base, known_commits.attempt_of(marker)


@dataclass(frozen=True)
class BaseEntries:
    """What this rank may reuse: base entry -> where its bytes are, and those files' records."""

    entries: Mapping[str, IndexEntry]  # location always set, content always set
    files: Mapping[str, FileRecord]  # run-root-relative path -> size and checksum


def load_base(backend: Backend, prefix: str, base: str | None, rank: int, attempt: str | None = None) -> BaseEntries:
    """The base's entries written by ``rank`` (empty when there is no usable base). When this
    process wrote them itself as ``attempt`` — the attempt the base's marker names now — they
    are not read back (:mod:`dist_ckpt.known_commits`)."""
    if base is None:
        return BaseEntries({}, {})
    known = known_commits.known_base(f"{backend.uri}/{run_parent(prefix)}", rank, base, attempt)
    if known is not None:
        return known
    base_prefix = join_key(run_parent(prefix), base)
    try:
        meta = read_checkpoint_metadata(backend, base_prefix)
    except CheckpointNotFound:
        log.info("base %s is gone: saving in full", base_prefix)
        return BaseEntries({}, {})
    if meta.format_version < 2 or meta.indexes is None:
        return BaseEntries({}, {})  # format 1 records no content hashes
    shard = next((n for n, r in meta.files.items() if r.index and r.rank == rank), None)
    if shard is None:
        return BaseEntries({}, {})
    entries: dict[str, IndexEntry] = {}
    files: dict[str, FileRecord] = {}
    for name, e in meta.indexes.entries(shard).items():
        if e.content is None:
            continue
        location = e.location or f"{base}/{shard}"
        record = meta.files.get(e.location or shard)
        if record is None:
            raise CorruptCheckpoint(f"{backend.uri}/{base_prefix}: entry {name!r} refers to an unlisted file")
        check_reference(location, f"{backend.uri}/{base_prefix}")
        chunks = _located_chunks(e.chunks, f"{base}/{shard}")
        entries[name] = IndexEntry(e.checksum, e.stored_bytes, e.content, location, chunks)
        files[location] = FileRecord(record.rank, record.size, record.checksum)
        for c in chunks or ():
            chunk_record = meta.files[shard if c[1] == f"{base}/{shard}" else c[1]]
            files[c[1]] = FileRecord(chunk_record.rank, chunk_record.size, chunk_record.checksum)
    return BaseEntries(entries, files)


def _located_chunks(chunks: tuple[ChunkRecord, ...] | None, own: str) -> tuple[ChunkRecord, ...] | None:
    """Chunk records with file ``""`` (the shard of the index) named ``own`` (run-root-relative)."""
    if chunks is None:
        return None
    return tuple(c if c[1] else (c[0], own, *c[2:]) for c in chunks)


def remember_written(
    backend: Backend,
    prefix: str,
    rank: int,
    attempt: str,
    shard: str,
    shard_record: FileRecord,
    index_extra: Mapping[str, IndexEntry],
    referenced: Mapping[str, FileRecord],
) -> None:
    """What :func:`load_base` would read back from this rank's part of the checkpoint just
    written at ``prefix`` by ``attempt`` (used only once a marker naming ``attempt`` is found)."""
    folder = prefix.strip("/").rsplit("/", 1)[-1]
    own = f"{folder}/{shard}"
    entries: dict[str, IndexEntry] = {}
    files: dict[str, FileRecord] = {}
    for name, e in index_extra.items():
        if e.content is None:
            continue
        location = e.location or own
        chunks = _located_chunks(e.chunks, own)
        entries[name] = IndexEntry(e.checksum, e.stored_bytes, e.content, location, chunks)
        record = referenced[location] if e.location else shard_record
        files[location] = FileRecord(record.rank, record.size, record.checksum)
        for c in chunks or ():
            r = shard_record if c[1] == own else referenced[c[1]]
            files[c[1]] = FileRecord(r.rank, r.size, r.checksum)
    known_commits.remember_base(
        f"{backend.uri}/{run_parent(prefix)}", rank, folder, attempt, BaseEntries(entries, files)
    )


def sample_hash(entry: PendingEntry) -> str:
    """xxh3-128 of dtype, shape, length and three 16 KiB slices (start, middle, end): equal for
    equal content, so a differing sample proves a change without hashing the whole entry."""
    h = xxhash.xxh3_128(f"{entry.dtype}|{','.join(map(str, entry.shape))}|".encode())
    data = entry.data.cast("B") if entry.data.format != "B" or entry.data.ndim != 1 else entry.data
    n = len(data)
    if n <= 4 * _SAMPLE:
        h.update(data)
    else:
        for start in (0, n // 2 - _SAMPLE // 2, n - _SAMPLE):
            h.update(data[start : start + _SAMPLE])
    h.update(str(n).encode())
    return h.hexdigest()


def _content(sample: str, full: str) -> str:
    """The content record of an entry: ``xxh3_128:<sample>:<full>`` (``<full>`` empty: not
    computed, the entry had changed — see :func:`split_entries`)."""
    return f"xxh3_128:{sample}:{full.removeprefix('xxh3_128:')}"


def _parts(content: str | None) -> tuple[str | None, str | None]:
    """``(sample, full)`` of a content record (a record without a sample: ``(None, full)``;
    one whose full hash was not computed: ``(sample, None)``)."""
    parts = (content or "").split(":")
    if len(parts) == 3 and parts[0] == "xxh3_128":
        return parts[1], parts[2] or None
    if len(parts) == 2 and parts[0] == "xxh3_128":
        return None, parts[1]
    return None, None


@dataclass(frozen=True)
class Split:
    """One rank's entries after matching: what to write, and what the index records."""

    to_write: list[PendingEntry]
    index_extra: dict[str, IndexEntry]  # content records of written entries (None: pending); reused entries
    referenced: dict[str, FileRecord]  # the files reused entries are in
    pending: dict[str, tuple[PendingEntry, str]]  # written entries whose full hash is still due (entry, sample)
    chunk_plans: dict[str, ChunkPlan] = field(default_factory=dict)  # zstd: written entries' chunks


def split_entries(
    entries: Sequence[PendingEntry],
    base: BaseEntries,
    read_stored: Callable[[str, IndexEntry], memoryview] | None = None,
    chunk_step: Callable[[PendingEntry], int | None] | None = None,
    read_chunk: ReadChunk | None = None,
) -> Split:
    """Keep out the tensor entries whose bytes the base already has (equal full content hash).
    Only entries whose sample matches the base's are hashed in full first — in a fine-tune,
    the frozen ones, which are then not written at all.

    An entry whose sample differs from the base entry's has certainly changed (equal content
    gives equal samples): it is written and its full hash is not computed at all — in a full
    fine-tune that is every entry, so an incremental save costs the samples only. Its record
    keeps the sample alone. If a later save finds the same sample again, the base has no full
    hash to match: the base's stored bytes of that entry are read back (``read_stored``) and
    hashed, once, and the entry is reused when the hashes are equal (its record then carries
    the full hash). An entry with no base entry (a first save, a new entry) is written and
    hashed in full while the shard is written (:func:`hashed_while`). With the zstd codec
    (``chunk_step``: raw bytes per chunk of an entry, None where not chunked) a written entry's
    unchanged chunks are kept out too (:mod:`dist_ckpt.incremental_chunks`)."""
    to_write: list[PendingEntry] = []
    extra: dict[str, IndexEntry] = {}
    referenced: dict[str, FileRecord] = {}
    pending: dict[str, tuple[PendingEntry, str]] = {}
    plans: dict[str, ChunkPlan] = {}
    for e in entries:
        if e.kind != "tensor":
            to_write.append(e)  # values are small JSON: always written
            continue
        sample = sample_hash(e)
        found = base.entries.get(e.name)
        base_sample, base_full = _parts(found.content if found is not None else None)
        located = found is not None and bool(found.location) and is_reference(found.location or "")
        if located and base_sample in (None, sample) and (base_full is not None or read_stored is not None):
            full = content_hash(e).removeprefix("xxh3_128:")
            if base_full is None:  # the base recorded its sample only: hash its stored bytes now
                base_full = _stored_hash(e, found, read_stored)  # type: ignore[arg-type]
            if full == base_full:
                extra[e.name] = replace(found, content=_content(sample, full))  # type: ignore[type-var]
                referenced[found.location] = base.files[found.location]  # type: ignore[union-attr,index]
                for c in found.chunks or ():  # type: ignore[union-attr]
                    referenced[c[1]] = base.files[c[1]]  # its shard's header points at them
                continue
            extra[e.name] = IndexEntry("", -1, _content(sample, full))  # checksum and size filled in after writing
        elif found is not None and base_sample is not None and base_sample != sample:
            extra[e.name] = IndexEntry("", -1, _content(sample, ""))  # changed: no full hash needed now
        else:
            extra[e.name] = IndexEntry("", -1, None)
            pending[e.name] = (e, sample)
        step = chunk_step(e) if chunk_step is not None else None
        plan = plan_chunks(e, step, found, base.files, read_chunk) if step else None
        if plan is not None:
            plans[e.name] = plan
            referenced.update(plan.files)
            if plan.files:
                e = replace(e, reuse=plan.reuse)
        to_write.append(e)
    return Split(to_write, extra, referenced, pending, plans)


def _stored_hash(
    entry: PendingEntry, found: IndexEntry, read_stored: Callable[[str, IndexEntry], memoryview]
) -> str | None:
    """The full content hash of the base's stored bytes of ``entry`` (None: unreadable — the
    entry is then written, never reused unchecked)."""
    try:
        stored = read_stored(entry.name, found)
    except (CorruptCheckpoint, BackendError) as e:
        log.warning(
            "%s: cannot read the base's bytes of %r to compare (%s): writing it again", found.location, entry.name, e
        )
        return None
    return content_hash(PendingEntry(entry.name, entry.dtype, entry.shape, stored)).removeprefix("xxh3_128:")


class StoredEntries:
    """Reads a base entry's stored (decoded) bytes from the file that holds them, checking
    its size against the file table and the entry checksum; one shard header read per file."""

    def __init__(self, backend: Backend, prefix: str, files: Mapping[str, FileRecord]):
        self.backend, self.prefix, self.files = backend, prefix, files
        self._readers: dict[str, ShardReader] = {}

    def __call__(self, name: str, found: IndexEntry) -> memoryview:
        location = found.location or ""
        reader = self._readers.get(location)
        if reader is None:
            reader = ShardReader(self.backend, file_key(self.prefix, location), self.files[location].size)
            self._readers[location] = reader
        return reader.read(name, checksum=found.checksum)

    def chunk(self, record: ChunkRecord, dtype: str) -> bytes:
        """The raw bytes of one base chunk (its stored bytes read by range, then decoded)."""
        from dist_ckpt.format.safetensors_header import header_length
        from dist_ckpt.format.zstd_codec import ZstdCodec

        key = file_key(self.prefix, record[1])
        size = self.backend.size(key)
        start = header_length(bytes(self.backend.read(key, 0, min(size, 8))), f"{self.backend.uri}/{key}", size)
        stored = self.backend.read(key, start + record[2], record[3])
        return ZstdCodec(threads=1).decode_chunk(stored, record[4], dtype)


def hashed_while(split: Split, write: Callable[[], T]) -> tuple[T, dict[str, str]]:
    """``write()`` while a helper thread computes the full content hashes still due; returns
    its result and ``entry -> content record`` of every written tensor entry. The write
    releases the GIL (I/O), so on a second core the hashing costs no wall time."""

    def hash_pending() -> dict[str, str]:
        return {name: _content(sample, content_hash(e)) for name, (e, sample) in split.pending.items()}

    if not split.pending:  # every written entry had changed (a full fine-tune): nothing to hash
        result, pending = write(), {}
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="dist_ckpt-content-hash") as pool:
            future = pool.submit(hash_pending)
            try:
                result = write()
            finally:
                pending = future.result()
    contents = {name: e.content for name, e in split.index_extra.items() if e.location is None and e.content}
    return result, {**contents, **pending}
