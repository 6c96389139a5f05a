"""DCP ``StorageReader`` over any backend (the load half of :mod:`dist_ckpt.storage`).

Every rank calls ``read_metadata`` (which refuses uncommitted steps), then ``read_data`` with
its own plan: it opens each shard it needs once (size checked against the file table, header
checked), and reads for each item only the bytes the item needs — for a compressed entry, only
the chunks covering them. Whole-entry reads are checked against the entry's checksum. On a
local file system, uncompressed full-entry reads go straight into the destination tensor.
"""

from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.dcp_view import dcp_metadata
from dist_ckpt.format.dtypes import safetensors_to_torch
from dist_ckpt.format.metadata_json import CheckpointMetadata, EntryRef
from dist_ckpt.format.shard import ChunkCodec, ShardReader
from dist_ckpt.references import file_key
from dist_ckpt.storage import CheckpointLocation, raw_bytes, read_checkpoint_metadata, wrap_backend_error
from storage_backends import Backend, BackendError

log = logging.getLogger(__name__)
_READ_THREADS = 8
_READ_PIECE = 4 << 20  # bytes per read_into call of an uncompressed entry


def _flat_span(
    shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]
) -> tuple[int, int, tuple[int, ...]]:
    """First and last flat element index of a box in a row-major tensor, and its strides."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    first = sum(o * s for o, s in zip(offsets, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides))
    return first, last, tuple(strides)


def _chunk_at(md: TensorStorageMetadata, index: Any) -> Any:
    """The chunk of ``md`` that ``index`` (a MetadataIndex) names, by its offsets."""
    offsets = tuple(index.offset) if index.offset is not None else ()
    if hasattr(md.chunks, "find"):  # format 2: O(1) from the layout rule
        return md.chunks.find(offsets)
    hint = index.index
    if hint is not None and 0 <= hint < len(md.chunks) and tuple(md.chunks[hint].offsets) == offsets:
        return md.chunks[hint]
    return next((c for c in md.chunks if tuple(c.offsets) == offsets), None)


class DistCkptReader(CheckpointLocation, StorageReader):
    """Reads one committed checkpoint below ``prefix`` of ``backend``."""

    def __init__(self, backend: Backend, prefix: str, *, codecs: dict[str, ChunkCodec] | None = None):
        super().__init__()
        self.backend, self.prefix = backend, prefix.strip("/")
        self.codecs = codecs
        self.checkpoint: CheckpointMetadata | None = None
        self._dcp: Metadata | None = None  # DCP's view of it, built once

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.checkpoint is None:
            self.checkpoint = read_checkpoint_metadata(self.backend, self.prefix)
        if self._dcp is None:
            self._dcp = dcp_metadata(self.checkpoint)
        return self._dcp

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data: dict[Any, EntryRef] = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read(plan, planner)
        except BackendError as e:
            raise wrap_backend_error(e, self.uri) from e
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        assert self.checkpoint is not None
        by_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            # resolved first: an incremental checkpoint's entry may be in an earlier step's file
            by_file[self._resolve(item).file].append(item)
        # Open (size + header check) every shard before copying anything, so a truncated or
        # damaged file fails by name before any tensor of the state is overwritten.
        shards = {}
        for file in by_file:
            record = self.checkpoint.files[file]
            shards[file] = ShardReader(self.backend, file_key(self.prefix, file), record.size, self.codecs)
            shards[file].files = self.checkpoint.files  # reused zstd chunks must be in listed files
        tensor_items: list[tuple[ShardReader, ReadItem]] = []
        for file, items in by_file.items():
            for item in items:
                if item.type == LoadItemType.BYTE_IO:
                    ref = self._resolve(item)
                    data = shards[file].read(ref.entry, checksum=ref.checksum)
                    try:
                        planner.load_bytes(item, io.BytesIO(bytes(data)))
                    except CorruptCheckpoint as e:  # the decoder knows the key, not the file
                        raise CorruptCheckpoint(f"{shards[file].header.file}: {e}") from e
                else:
                    tensor_items.append((shards[file], item))
        # Every entry's header against metadata.json too, before the first tensor is copied.
        for shard, item in tensor_items:
            self._check_entry(shard, item)
        if len(tensor_items) <= 1:
            for shard, item in tensor_items:
                self._read_tensor(shard, item, planner)
            return
        with ThreadPoolExecutor(min(_READ_THREADS, len(tensor_items)), thread_name_prefix="dist_ckpt-read") as pool:
            for fut in [pool.submit(self._read_tensor, shard, item, planner) for shard, item in tensor_items]:
                fut.result()

    def _resolve(self, item: ReadItem) -> EntryRef:
        assert self.checkpoint is not None
        return self.checkpoint.resolve(self.storage_data[item.storage_index])

    def _check_entry(
        self, shard: ShardReader, item: ReadItem
    ) -> tuple[EntryRef, Any, torch.dtype, tuple[int, ...], tuple[int, ...]]:
        """The entry a tensor item reads, checked against metadata.json (header only, no data)."""
        assert self.checkpoint is not None
        # format 2: the checksum comes from the rank index of this file (read once, on demand)
        ref = self._resolve(item)
        info = shard.entry(ref.entry)
        dtype = safetensors_to_torch().get(info.dtype)
        if info.kind != "tensor" or dtype is None:
            raise CorruptCheckpoint(
                f"{shard.header.file}, entry {ref.entry!r}: expected a tensor, found {info.kind}/{info.dtype}"
            )
        lengths, offsets = tuple(item.lengths), tuple(item.storage_offsets)
        # The shard's own header must agree with metadata.json: the box read lies inside the
        # entry (else the read would run into the next entry's bytes) and the dtype matches.
        if len(offsets) != len(info.shape) or any(o + n > s for o, n, s in zip(offsets, lengths, info.shape)):
            raise CorruptCheckpoint(
                f"{shard.header.file}, entry {ref.entry!r}: holds shape {list(info.shape)}, but metadata.json "
                f"needs the box at {list(offsets)} of size {list(lengths)}"
            )
        md = self._dcp.state_dict_metadata.get(item.storage_index.fqn) if self._dcp is not None else None
        if isinstance(md, TensorStorageMetadata) and md.properties.dtype != dtype:
            raise CorruptCheckpoint(
                f"{shard.header.file}, entry {ref.entry!r}: holds {info.dtype}, but metadata.json "
                f"says {md.properties.dtype}"
            )
        if isinstance(md, TensorStorageMetadata):
            # Each entry is exactly one chunk of metadata.json: a shard declaring a bigger entry
            # (huge shape and chunk table) must not make a partial read allocate its chunks.
            chunk = _chunk_at(md, item.storage_index)
            if chunk is not None and tuple(chunk.sizes) != tuple(info.shape):
                raise CorruptCheckpoint(
                    f"{shard.header.file}, entry {ref.entry!r}: holds shape {list(info.shape)}, but metadata.json "
                    f"records this chunk as {list(chunk.sizes)}"
                )
        return ref, info, dtype, lengths, offsets

    def _read_tensor(self, shard: ShardReader, item: ReadItem, planner: LoadPlanner) -> None:
        ref, info, dtype, lengths, offsets = self._check_entry(shard, item)
        target = planner.resolve_tensor(item).detach()
        if tuple(target.shape) != lengths:
            raise CorruptCheckpoint(
                f"{shard.header.file}, entry {ref.entry!r}: read box {list(lengths)} does not fit "
                f"target {list(target.shape)}"
            )
        if math.prod(lengths) == 0:
            planner.commit_tensor(item, target)
            return
        whole = offsets == (0,) * len(info.shape) and lengths == info.shape
        if (
            whole
            and info.codec == "none"
            and target.device.type == "cpu"
            and target.dtype == dtype
            and target.is_contiguous()
        ):
            # Straight into the target, in pieces hashed as each arrives: the hash then reads
            # bytes still in the CPU cache instead of making a second pass through memory.
            out = raw_bytes(target)
            digest = xxhash.xxh3_64()
            for pos in range(0, len(out), _READ_PIECE):
                piece = out[pos : pos + _READ_PIECE]
                if shard.backend.read_into(shard.key, info.begin + pos, piece) != len(piece):
                    raise CorruptCheckpoint(f"{shard.header.file}, entry {ref.entry!r}: short read (truncated file)")
                digest.update(piece)
            shard.check_digest(info, digest.hexdigest(), ref.checksum)
        else:
            first, last, strides = _flat_span(info.shape, offsets, lengths)
            itemsize = torch.empty((), dtype=dtype).element_size()
            span = shard.read(
                ref.entry, first * itemsize, (last + 1) * itemsize, checksum=ref.checksum if whole else None
            )
            flat = torch.frombuffer(bytearray(span), dtype=torch.uint8).view(dtype)
            source = torch.as_strided(flat, lengths, strides) if lengths else flat.reshape(())
            target.copy_(source)
        planner.commit_tensor(item, target)
