"""The ``zstd`` codec of shard entries: chunked, byte-transformed, zstd-compressed, on a thread pool.

An entry's raw bytes are cut into chunks of ``chunk_bytes`` (rounded down to a multiple of the
element size, so no element is ever split); each chunk is transformed (see ``byte_group``) into a
few byte streams, each stream is zstd-compressed or kept raw when zstd would not gain, and the
chunk is stored self-describing and checksummed. zstd releases the GIL, so chunks compress and
decompress in parallel on a plain ThreadPoolExecutor.

Stored chunk (all integers little-endian)::

    offset  size  field
    0       1     format version (1)
    1       1     transform: 0 = none (1-byte elements), 1 = byte_group, 2 = split_float,
                  3 = rotate_left1 then byte_group (F16)
    2       1     itemsize of the entry's dtype
    3       1     S = number of streams (the last one is the tail: raw_len % itemsize bytes)
    4       4     raw_len (bytes this chunk decodes to)
    8       2     base exponent (split_float; 0 otherwise)
    10      5*S   per stream: mode u8 (0 = raw bytes, 1 = one zstd frame), stored length u32
    ...           the S stream payloads, back to back
    end-8   8     xxh3_64 of every byte before it

Every zstd frame carries its content size and content checksum, so a decoder bug or a corrupt
frame is caught even where the trailer would not be; the trailer covers the header and the raw
(uncompressed) streams. Any failure raises ``CorruptCheckpoint`` naming the chunk index; the
shard reader adds the file and entry name.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import xxhash
import zstandard

from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.format import byte_group as bg

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_BYTES_MAX = 1 << 30  # a declared raw length above this is refused before any allocation
T_NONE, T_GROUP, T_SPLIT, T_ROT_GROUP = 0, 1, 2, 3
MODE_RAW, MODE_ZSTD = 0, 1
_HEAD = struct.Struct("<BBBBIH")
_STREAM = struct.Struct("<BI")
_TRAILER = struct.Struct("<Q")
_MIN_COMPRESS = 64  # smaller streams are stored raw: a zstd frame has ~20 bytes of overhead
_MIN_GAIN = 64  # keep a zstd frame only if it saves >= 1/64 of the stream: near-random planes
#                 stored raw decode at memcpy speed


# --- per-thread zstd contexts and shared pools ------------------------------------------------

_local = threading.local()  # ZstdCompressor/ZstdDecompressor are not thread-safe: one per thread
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_idle_work: list[bg.Workspace] = []
_work_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has the parent's pools but none of their threads, and locks that may
    have been held at the fork: start from scratch."""
    global _pools_lock, _work_lock
    _pools.clear()
    _idle_work.clear()
    _pools_lock, _work_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx


@contextmanager
def _borrowed_workspace() -> Iterator[bg.Workspace]:
    """Scratch buffers for one chunk (~6x its raw size for BF16/F32), from a free list: reused
    chunk after chunk (fresh multi-MB numpy temporaries page-fault: 10x the arithmetic), yet
    never more of them than chunks in flight, and dropped by :func:`release_buffers`."""
    with _work_lock:
        work = _idle_work.pop() if _idle_work else bg.Workspace()
    try:
        yield work
    finally:
        with _work_lock:
            _idle_work.append(work)


def release_buffers() -> None:
    """Free the idle scratch buffers (e.g. after a save, to give the memory back)."""
    with _work_lock:
        _idle_work.clear()


def _dctx() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


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


# --- one chunk --------------------------------------------------------------------------------


_TRANSFORM_IDS = {bg.NONE: T_NONE, bg.GROUP: T_GROUP, bg.SPLIT: T_SPLIT, bg.ROT_GROUP: T_ROT_GROUP}


def _transform_of(dtype: str) -> tuple[int, int]:
    """(transform id, itemsize) for a safetensors dtype."""
    itemsize = bg.itemsize_of(dtype)
    return _TRANSFORM_IDS[bg.DTYPES[dtype][1]], itemsize


def _stream_count(transform: int, itemsize: int) -> int:
    """Streams in a chunk, the tail stream included."""
    if transform == T_NONE:
        return 2
    if transform == T_SPLIT:
        return len(bg.split_float_sizes(itemsize, 0, 0)) + 1
    return itemsize + 1


def _pack_stream(data: np.ndarray, level: int) -> tuple[int, bytes | np.ndarray]:
    if data.size < _MIN_COMPRESS:
        return MODE_RAW, data
    frame = _cctx(level).compress(data)
    if len(frame) <= data.size - data.size // _MIN_GAIN:
        return MODE_ZSTD, frame
    return MODE_RAW, data


def encode_chunk(piece: memoryview, dtype: str, level: int) -> bytes:
    """Transform and compress one chunk (whole elements, plus a partial tail in the last one)."""
    with _borrowed_workspace() as work:  # the streams may live in it until the join below
        return _encode_chunk(piece, dtype, level, work)


def _encode_chunk(piece: memoryview, dtype: str, level: int, work: bg.Workspace) -> bytes:
    transform, itemsize = _transform_of(dtype)
    body = np.frombuffer(piece, dtype=np.uint8)
    n = body.size // itemsize
    whole = body[: n * itemsize]
    base = 0
    if transform == T_NONE:
        streams = [body]
    elif transform == T_SPLIT:
        base, streams = bg.split_float(whole, itemsize, work)
    else:
        if transform == T_ROT_GROUP:
            words = whole.view("<u2")
            whole = bg.rotate_left1(words, out=work.get("rotated", n, "<u2"), work=work).view(np.uint8)
        planes = bg.byte_group(whole, itemsize, work)
        streams = [planes[j * n : (j + 1) * n] for j in range(itemsize)]
    tail = body[n * itemsize :] if transform != T_NONE else body[:0]
    packed = [_pack_stream(s, level) for s in streams] + [(MODE_RAW, tail)]
    parts: list[bytes | np.ndarray] = [_HEAD.pack(FORMAT_VERSION, transform, itemsize, len(packed), body.size, base)]
    parts += [_STREAM.pack(mode, len(payload)) for mode, payload in packed]
    parts += [payload for _, payload in packed]
    digest = xxhash.xxh3_64()
    for part in parts:  # hashing the parts spares one copy of the whole chunk
        digest.update(part)
    parts.append(_TRAILER.pack(digest.intdigest()))
    return b"".join(parts)


def _corrupt(index: int, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"chunk {index}: {what}; the stored data is damaged")


def _check_raw_len(index: int, raw_len: int) -> None:
    if not 0 <= raw_len <= CHUNK_BYTES_MAX:
        raise _corrupt(index, f"declared raw length {raw_len} is outside [0, {CHUNK_BYTES_MAX}]; refusing to allocate")


def _unpack_stream(index: int, which: int, mode: int, payload: memoryview, expected: int) -> np.ndarray:
    if mode == MODE_RAW:
        if len(payload) != expected:
            raise _corrupt(index, f"stream {which} holds {len(payload)} raw bytes, expected {expected}")
        return np.frombuffer(payload, dtype=np.uint8)
    if mode != MODE_ZSTD:
        raise _corrupt(index, f"stream {which} has unknown mode {mode}")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise _corrupt(index, f"stream {which} is not a zstd frame ({e})") from e
    if declared != expected:  # also refuses absurd sizes before zstd allocates them
        raise _corrupt(index, f"stream {which} declares {declared} decoded bytes, expected {expected}")
    try:
        data = _dctx().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise _corrupt(index, f"zstd failed on stream {which} ({e})") from e
    if len(data) != expected:
        raise _corrupt(index, f"stream {which} decoded to {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8)


def decode_chunk_into(
    stored: bytes | memoryview, raw_len: int, dtype: str, dst: np.ndarray, index: int = 0
) -> None:
    """Decode one stored chunk into ``dst`` (uint8, ``raw_len`` long); raises CorruptCheckpoint."""
    with _borrowed_workspace() as work:
        _decode_chunk_into(stored, raw_len, dtype, dst, index, work)


def _decode_chunk_into(
    stored: bytes | memoryview, raw_len: int, dtype: str, dst: np.ndarray, index: int, work: bg.Workspace
) -> None:
    _check_raw_len(index, raw_len)
    if dst.size != raw_len:
        raise ValueError(f"chunk {index}: output buffer holds {dst.size} bytes, the chunk decodes to {raw_len}")
    transform, itemsize = _transform_of(dtype)
    view = memoryview(stored).cast("B")
    fixed = _HEAD.size + _TRAILER.size
    if len(view) < fixed:
        raise _corrupt(index, f"truncated: {len(view)} bytes, shorter than a chunk's {fixed}-byte header and trailer")
    body = view[: -_TRAILER.size]
    (want,) = _TRAILER.unpack(view[-_TRAILER.size :])
    found = xxhash.xxh3_64_intdigest(body)
    if found != want:
        what = f"checksum mismatch (expected xxh3_64 {want:016x}, found {found:016x}), truncated or altered"
        raise _corrupt(index, what)
    version, t, isz, nstreams, hdr_raw, base = _HEAD.unpack(body[: _HEAD.size])
    if version != FORMAT_VERSION:
        raise _corrupt(index, f"format version {version}, this build reads {FORMAT_VERSION}")
    if (t, isz) != (transform, itemsize):
        raise _corrupt(index, f"transform {t}/itemsize {isz}, expected {transform}/{itemsize} for dtype {dtype}")
    if hdr_raw != raw_len:
        raise _corrupt(index, f"decodes to {hdr_raw} bytes but the chunk table says {raw_len}")
    pos = _HEAD.size + nstreams * _STREAM.size
    if nstreams < 1 or pos > len(body):
        raise _corrupt(index, f"bad stream count {nstreams}")
    table = [_STREAM.unpack_from(body, _HEAD.size + i * _STREAM.size) for i in range(nstreams)]
    listed = sum(length for _, length in table)
    if pos + listed != len(body):
        raise _corrupt(index, f"stream lengths sum to {listed}, the chunk holds {len(body) - pos}")
    payloads = []
    for _, length in table:
        payloads.append(body[pos : pos + length])
        pos += length
    n = raw_len // itemsize
    tail_len = raw_len - n * itemsize if transform != T_NONE else 0

    def stream(i: int, expected: int) -> np.ndarray:
        return _unpack_stream(index, i, table[i][0], payloads[i], expected)

    expect_streams = _stream_count(transform, itemsize)
    if nstreams != expect_streams:
        raise _corrupt(index, f"{nstreams} streams, expected {expect_streams}")
    whole = dst[: n * itemsize]
    if transform == T_NONE:
        dst[:raw_len] = stream(0, raw_len)
    elif transform == T_SPLIT:
        if base > 256 - 15:
            raise _corrupt(index, f"base exponent {base} out of range")
        joint = stream(0, n)
        sizes = bg.split_float_sizes(itemsize, n, bg.count_escapes(joint))
        streams = [joint] + [stream(i, sizes[i]) for i in range(1, len(sizes))]
        bg.merge_float(base, streams, itemsize, whole, work)
    else:
        grid = whole.reshape(n, itemsize)
        for j in range(itemsize):
            grid[:, j] = stream(j, n)
        if transform == T_ROT_GROUP:
            words = whole.view("<u2")
            bg.rotate_right1(words, out=words, work=work)
    dst[raw_len - tail_len : raw_len] = stream(nstreams - 1, tail_len)


# --- the codec --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZstdCodec:
    """Chunked zstd codec; decoding needs no parameter from the writer (chunks self-describe)."""

    level: int = 1
    chunk_bytes: int = 4 * 1024 * 1024  # raw bytes per chunk (rounded down to a multiple of the element size)
    threads: int | None = None  # thread pool size; None = the CPUs this process may use
    name: ClassVar[str] = "zstd"

    def __post_init__(self) -> None:
        if not zstandard.MAX_COMPRESSION_LEVEL >= self.level >= -(1 << 17):
            raise ConfigError(f"zstd level must be in [-131072, {zstandard.MAX_COMPRESSION_LEVEL}], got {self.level}")
        if not 1 <= self.chunk_bytes <= CHUNK_BYTES_MAX:
            raise ConfigError(f"chunk_bytes must be in [1, {CHUNK_BYTES_MAX}], got {self.chunk_bytes}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {self.threads}")

    @property
    def pool_size(self) -> int:
        return self.threads if self.threads is not None else _default_threads()

    def step(self, dtype: str) -> int:
        """Raw bytes per chunk for this dtype: never splits an element."""
        k = bg.itemsize_of(dtype)
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
        _check_raw_len(index, raw_len)  # before allocating the output
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
            _check_raw_len(first_index + i, raw_len)
        dst = np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
        if dst.size != sum(raw_lens):
            raise ValueError(f"out holds {dst.size} bytes but the chunks decode to {sum(raw_lens)}")
        bounds = [0, *np.cumsum(raw_lens, dtype=np.int64).tolist()]
        jobs = [(c, raw_lens[i], dst[bounds[i] : bounds[i + 1]], first_index + i) for i, c in enumerate(chunks)]
        threads = self.pool_size
        if threads == 1 or len(jobs) <= 1:
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
