"""The ``zstd`` codec of shard entries: chunked, byte-transformed, zstd-compressed, on a thread pool.

An entry's raw bytes are cut into chunks of ``chunk_bytes`` (rounded down to a multiple of the
element size, so no element is ever split); each chunk is encoded on its own (wire format,
transforms and checks: ``zstd_chunk``). zstd and the numba kernels release the GIL, so chunks
compress and decompress in parallel on a plain ThreadPoolExecutor. Any failure raises
``CorruptCheckpoint`` naming the chunk index; the shard reader adds the file and entry name.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dist_ckpt.errors import ConfigError
from dist_ckpt.format.dtypes import safetensors_itemsize
from dist_ckpt.format.zstd_chunk import (  # noqa: F401  (re-exported: the codec's public surface)
    CHUNK_BYTES_MAX,
    FORMAT_VERSION,
    check_raw_len,
    decode_chunk_into,
    encode_chunk,
    release_buffers,
)
from dist_ckpt.format.zstd_level import check_level

log = logging.getLogger(__name__)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has the parent's pools but none of their threads, and a lock that may
    have been held at the fork: start from scratch."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(threads: int) -> ThreadPoolExecutor:
    """The module's pool for this thread count, created on first use."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            log.debug("starting a %d-thread zstd pool", threads)
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"dist-ckpt-zstd{threads}")
        return pool


def _default_threads() -> int:
    count: Callable[[], int | None] = getattr(os, "process_cpu_count", os.cpu_count)
    return count() or 1


# --- the codec --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZstdCodec:
    """Chunked zstd codec; decoding needs no parameter from the writer (chunks self-describe)."""

    level: int = 1
    chunk_bytes: int = 4 * 1024 * 1024  # raw bytes per chunk (rounded down to a multiple of the element size)
    threads: int | None = None  # thread pool size; None = the CPUs this process may use
    name: ClassVar[str] = "zstd"

    def __post_init__(self) -> None:
        check_level(self.level, "level")
        if not 1 <= self.chunk_bytes <= CHUNK_BYTES_MAX:
            raise ConfigError(f"chunk_bytes must be in [1, {CHUNK_BYTES_MAX}], got {self.chunk_bytes}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {self.threads}")

    @property
    def pool_size(self) -> int:
        return self.threads if self.threads is not None else _default_threads()

    def step(self, dtype: str) -> int:
        """Raw bytes per chunk for this dtype: never splits an element."""
        k = safetensors_itemsize(dtype)
        return max(k, self.chunk_bytes - self.chunk_bytes % k)

    def encode(self, raw: memoryview, dtype: str) -> Iterator[tuple[bytes, int]]:
        """Yield (stored_chunk_bytes, raw_len) for each chunk of `raw`, in order. Chunks are
        transformed (byte_group / split_float) then zstd-compressed on a shared thread pool, at
        most 2×threads chunks ahead of the consumer (bounded memory: the whole entry is never
        compressed at once). An empty entry has no chunks."""
        view = memoryview(raw).cast("B")
        step, total = self.step(dtype), len(view)
        offsets = range(0, total, step)
        threads = self.pool_size
        if threads == 1 or len(offsets) <= 1:  # no hand-off cost where there is nothing to overlap
            for off in offsets:
                piece = view[off : off + step]
                yield encode_chunk(piece, dtype, self.level), len(piece)
            return
        pool, ahead = _pool(threads), 2 * threads
        pending: deque[tuple[Future[bytes], int]] = deque()
        try:
            for off in offsets:
                piece = view[off : off + step]
                pending.append((pool.submit(encode_chunk, piece, dtype, self.level), len(piece)))
                if len(pending) >= ahead:
                    future, raw_len = pending.popleft()
                    yield future.result(), raw_len
            while pending:
                future, raw_len = pending.popleft()
                yield future.result(), raw_len
        finally:  # consumer stopped early or a chunk failed: drop queued work
            for future, _ in pending:
                future.cancel()

    def decode_chunk(self, stored: bytes | memoryview, raw_len: int, dtype: str, *, index: int = 0) -> bytes:
        """Decode one chunk; ``index`` only names the chunk in error messages."""
        check_raw_len(index, raw_len)  # before allocating the output
        out = bytearray(raw_len)
        decode_chunk_into(stored, raw_len, dtype, np.frombuffer(out, dtype=np.uint8), index)
        return bytes(out)

    def decode_into(
        self,
        chunks: Sequence[bytes | memoryview],
        raw_lens: Sequence[int],
        dtype: str,
        out: memoryview,
        *,
        first_index: int = 0,
    ) -> None:
        """Decompress several consecutive chunks in parallel into `out` (len(out) == sum(raw_lens)).
        ``first_index`` is the index of ``chunks[0]`` in the entry, for error messages."""
        if len(chunks) != len(raw_lens):
            raise ValueError(f"{len(chunks)} chunks but {len(raw_lens)} raw lengths")
        for i, raw_len in enumerate(raw_lens):
            check_raw_len(first_index + i, raw_len)
        dst = np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
        bounds = [0, *itertools.accumulate(raw_lens)]
        if dst.size != bounds[-1]:
            raise ValueError(f"out holds {dst.size} bytes but the chunks decode to {bounds[-1]}")
        if len(chunks) == 1:  # most tensors: no job list (its cost shows on small tensors)
            decode_chunk_into(chunks[0], raw_lens[0], dtype, dst, first_index)
            return
        jobs = [(c, raw_lens[i], dst[bounds[i] : bounds[i + 1]], first_index + i) for i, c in enumerate(chunks)]
        threads = self.pool_size
        if threads == 1:
            for c, raw_len, part, idx in jobs:
                decode_chunk_into(c, raw_len, dtype, part, idx)
            return
        pool = _pool(threads)
        futures = [pool.submit(decode_chunk_into, c, raw_len, dtype, part, idx) for c, raw_len, part, idx in jobs]
        errors = [f.exception() for f in futures]  # wait for all: none may still write into `out`
        for err in errors:
            if err is not None:
                raise err


def chunk_range_for_bytes(raw_lens: Sequence[int], start: int, stop: int) -> tuple[int, int]:
    """Index range [first, last) of the chunks that cover raw bytes [start, stop).
    An empty byte range gives an empty chunk range."""
    ends = np.cumsum(raw_lens, dtype=np.int64).tolist() if len(raw_lens) else []
    total = ends[-1] if ends else 0
    if not 0 <= start <= stop <= total:
        raise ValueError(f"byte range [{start}, {stop}) is outside the entry's {total} bytes")
    first = bisect.bisect_right(ends, start)  # first chunk ending after `start` holds it
    if stop == start:
        return first, first
    last = bisect.bisect_left(ends, stop) + 1  # first chunk ending at or after `stop` holds stop-1
    return first, last
