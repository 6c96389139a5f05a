"""DCP ``StorageWriter`` / ``StorageReader`` over any :class:`storage_backends.Backend`.

Save call order (DCP drives it; "coordinator" is rank 0 of the process group):

1. every rank: ``set_up_storage_writer`` → ``prepare_local_plan``;
2. coordinator: ``prepare_global_plan`` refuses a step that is already committed, picks a
   fresh attempt id and the staging prefix, and tells each rank its shard file name;
3. every rank: ``write_data`` streams its items into one safetensors shard (checksums computed
   while writing) and reports where each item went;
   and its rank index (``index_NNNNN.safetensors``: each entry's checksum and stored size);
4. coordinator: ``finish`` builds the :class:`~dist_ckpt.commit_record.CommitRecord` and runs
   :func:`dist_ckpt.commit.commit_checkpoint`: ``metadata.json`` (format 2: O(tensors + ranks), see
   :mod:`dist_ckpt.format.metadata_v2`) (create-if-absent, so of two racing jobs
   only one proceeds), renews the run lock through the manager's fence (a conditional write:
   a job that lost the lock raises ``RunLocked`` here and makes nothing visible), then writes
   ``COMMITTED``, then publishes the staging prefix (local: rename ``step_X.tmp-<attempt>`` →
   ``step_X``).

Load: every rank reads ``metadata.json`` (only after checking ``COMMITTED``), then reads the
entries its plan needs. Nothing is unpickled; values are JSON.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dist_ckpt import known_commits

# the torch-free half (what the command line reads), re-exported for the modules that import it from here
from dist_ckpt.checkpoint_files import read_checkpoint_metadata, wrap_backend_error  # noqa: F401
from dist_ckpt.commit import commit_checkpoint
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.errors import CorruptCheckpoint, StepAlreadyExists
from dist_ckpt.format import chunk_layout, metadata_v2
from dist_ckpt.format.dtypes import torch_to_safetensors
from dist_ckpt.format.metadata_json import EntryRef, FileRecord
from dist_ckpt.format.rank_index import IndexEntry, index_entry, index_name
from dist_ckpt.format.shard import ChunkCodec, PendingEntry, save_shard
from dist_ckpt.incremental import StoredEntries, choose_base, hashed_while, load_base, remember_written, split_entries
from dist_ckpt.incremental import base_attempt as base_attempt_of
from dist_ckpt.incremental_chunks import chunk_steps, finish_records
from dist_ckpt.layout import COMMITTED
from dist_ckpt.lock_fence import Fence
from dist_ckpt.references import is_reference, own_and_logical_bytes
from storage_backends import Backend, BackendError, join_key

log = logging.getLogger(__name__)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A C-contiguous CPU tensor's bytes without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def entry_name(index: MetadataIndex) -> str:
    return chunk_layout.entry_name(index.fqn, index.offset)


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator tells each rank in ``prepare_global_plan``."""

    staging: str
    file: str
    rank: int
    incremental: bool = False  # record content hashes, reuse the base's entries
    base: str | None = None  # the base checkpoint's folder in the run root (None: full save)
    attempt: str = ""  # this save's attempt id (incremental: named in COMMITTED)
    base_attempt: str | None = None  # the attempt the base's COMMITTED names (dist_ckpt.known_commits)


@dataclass(frozen=True)
class _ItemResult:
    ref: EntryRef
    file: FileRecord
    index: FileRecord  # the rank index file of ``file``
    referenced: dict[str, FileRecord] | None = None  # incremental: files of earlier steps read


class CheckpointLocation:
    """What our writer and reader share: one checkpoint folder ``prefix`` of ``backend``,
    fixed at construction (DCP's ``checkpoint_id`` is not used)."""

    backend: Backend
    prefix: str

    @property
    def uri(self) -> str:
        return f"{self.backend.uri}/{self.prefix}"

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class DistCkptWriter(CheckpointLocation, StorageWriter):
    """Writes one checkpoint (one step) below ``prefix`` of ``backend``."""

    def __init__(
        self,
        backend: Backend,
        prefix: str,
        *,
        codec: ChunkCodec | None = None,
        commit_info: dict[str, Any] | None = None,
        fence: Fence | None = None,
    ):
        super().__init__()
        self.backend, self.prefix, self.codec = backend, prefix.strip("/"), codec
        self.commit_info = dict(commit_info or {})
        # incremental saves (dist_ckpt.incremental): True (newest committed step before this one)
        # or the base folder's name; carried in commit_info so async jobs need no new field
        self.incremental: str | bool | None = self.commit_info.pop("incremental", None)
        self._base: str | None = None
        self._attempt: str | None = None
        self.fence = fence  # the run lock's holder (a manager's save): checked right before COMMITTED
        self.is_coordinator = False
        self._staging = ""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self.backend.exists(join_key(self.prefix, COMMITTED)):
            raise StepAlreadyExists(
                f"{self.uri} is already committed; a committed step is never overwritten. "
                "Save under a new step, or delete that checkpoint first (dist-ckpt prune)."
            )
        attempt = uuid.uuid4().hex[:12]
        staging = self.backend.staging_prefix(self.prefix, attempt)
        # Where shards are written straight to the final prefix (S3), a racing job of the same
        # step must not overwrite our files: the attempt id goes into their names.
        suffix = f"-{attempt}" if staging == self.prefix else ""
        self._staging = staging
        incremental = self.incremental is not None and self.incremental is not False  # "": hashes, no base
        self._attempt = attempt if incremental else None
        chosen = choose_base(self.backend, self.prefix, self.incremental)
        self._base, base_attempt = base_attempt_of(self.backend, self.prefix, chosen)
        return [
            replace(
                plan,
                storage_data=_Assignment(
                    staging,
                    f"rank_{rank:05d}{suffix}.safetensors",
                    rank,
                    incremental,
                    self._base,
                    attempt,
                    base_attempt,
                ),
            )
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fut: Future[list[WriteResult]] = Future()
        try:
            fut.set_result(self._write(plan, planner))
        except BackendError as e:
            raise wrap_backend_error(e, self.uri) from e
        return fut

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        if not plan.items:
            return []
        assignment: _Assignment = plan.storage_data
        entries: list[PendingEntry] = []
        for item in plan.items:
            data = planner.resolve_data(item)
            name = entry_name(item.index)
            if item.type == WriteItemType.BYTE_IO:
                entries.append(PendingEntry(name, "U8", (len(data.getvalue()),), memoryview(data.getvalue()), "json"))
                continue
            tensor = data.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            tensor = tensor.contiguous()
            st_dtype = torch_to_safetensors().get(tensor.dtype)
            if st_dtype is None:
                raise CorruptCheckpoint(f"{item.index.fqn}: dtype {tensor.dtype} cannot be stored in safetensors")
            entries.append(PendingEntry(name, st_dtype, tuple(tensor.shape), raw_bytes(tensor)))
        key = join_key(assignment.staging, assignment.file)
        extra: dict[str, IndexEntry] = {}
        referenced: dict[str, FileRecord] = {}
        if assignment.incremental:  # hashing here runs on the staged copy (async: in the background)
            base = load_base(self.backend, self.prefix, assignment.base, assignment.rank, assignment.base_attempt)
            stored_entries = StoredEntries(self.backend, self.prefix, base.files)
            steps = chunk_steps(self.codec)
            split = split_entries(entries, base, stored_entries, steps, stored_entries.chunk if steps else None)
            extra, referenced = split.index_extra, split.referenced
            written, contents = hashed_while(split, lambda: save_shard(self.backend, key, split.to_write, self.codec))
            for name, e in extra.items():
                if e.location is None:  # written now: its checksum and stored size are known now
                    chunk_plan = split.chunk_plans.get(name)
                    chunks = finish_records(chunk_plan.records, written.chunk_offsets[name]) if chunk_plan else None  # type: ignore[index]
                    extra[name] = IndexEntry(
                        written.entry_checksums[name], written.stored_bytes[name], contents[name], None, chunks
                    )
        else:
            written = save_shard(self.backend, key, entries, self.codec)
        # The per-entry checksums go to this rank's own index file, not into metadata.json
        # (which every rank reads): a restoring rank reads only the indexes of its files.
        index_file = index_name(assignment.file)
        index_key = join_key(assignment.staging, index_file)
        index_entries = [index_entry(assignment.file, written.entry_checksums, written.stored_bytes, extra)]
        index_written = save_shard(self.backend, index_key, index_entries, None)
        index_record = FileRecord(assignment.rank, index_written.size, index_written.checksum)
        record = FileRecord(assignment.rank, written.size, written.checksum, index_file)
        if assignment.incremental:  # the next save's base entries, if this attempt commits
            remember_written(
                self.backend,
                self.prefix,
                assignment.rank,
                assignment.attempt,
                assignment.file,
                record,
                extra,
                referenced,
            )
        stored = {n: (written.entry_checksums[n], written.stored_bytes[n]) for n in written.entry_checksums}
        stored.update({n: (e.checksum, e.stored_bytes) for n, e in extra.items() if e.location is not None})
        # No result per chunk of a tensor a split rule describes (compact_plan): the coordinator
        # gathers O(tensors + ranks) results; the first carries this rank's file records.
        from dist_ckpt.compact_plan import RuledPlanner  # here: the imports above are the layout's

        ruled = planner.ruled_fqns if isinstance(planner, RuledPlanner) else frozenset()
        return [
            WriteResult(
                index=item.index,
                size_in_bytes=stored[e.name][1],
                storage_data=_ItemResult(
                    EntryRef(assignment.file, e.name, *stored[e.name]),
                    record,
                    index_record,
                    referenced if i == 0 else None,
                ),
            )
            for i, (item, e) in enumerate(zip(plan.items, entries))
            if i == 0 or item.index.fqn not in ruled
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            # One pass over the results: which rank stored each chunk (metadata.json describes
            # that by rule where one fits), the values' references, and the file table.
            chunk_ranks: dict[tuple[str, Any], int] = {}
            values: dict[str, EntryRef] = {}
            files: dict[str, FileRecord] = {}
            for rank_results in results:
                if rank_results:
                    first: _ItemResult = rank_results[0].storage_data
                    files[first.ref.file] = first.file
                    files[first.file.index or ""] = first.index
                    files.update(first.referenced or {})  # incremental: earlier steps' files it reads
                for wr in rank_results:
                    if wr.index.offset is None:
                        values[wr.index.fqn] = wr.storage_data.ref
                    else:
                        chunk_ranks[wr.index.fqn, wr.index.offset] = wr.storage_data.file.rank
            staging = self._staging
            versions = {"torch": torch.__version__, "dist_ckpt": _version()}
            codec = self.codec.name if self.codec else "none"
            doc = metadata_v2.dumps(metadata, chunk_ranks, values, files, len(results), codec, versions)
            own_bytes, logical_bytes = own_and_logical_bytes(files)
            record = CommitRecord.new(
                self.commit_info,
                world_size=len(results),
                files=len(files),
                bytes=own_bytes,
                logical_bytes=logical_bytes,
                base=self._base,
                attempt=self._attempt,
                where=f"{self.uri}/{COMMITTED}",
            )
            marker = record.to_json()
            commit_checkpoint(self.backend, staging, self.prefix, doc, marker, where=self.uri, fence=self.fence)
            # retention need not read this metadata.json back to know what it references
            known_commits.remember_references(f"{self.uri}/{COMMITTED}", marker, (n for n in files if is_reference(n)))
        except BackendError as e:
            raise wrap_backend_error(e, self.uri) from e


def _version() -> str:
    from dist_ckpt.version import __version__

    return __version__
