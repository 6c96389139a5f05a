"""One chunk of the ``zstd`` codec: its wire format, encode and decode (``zstd_codec`` cuts
entries into chunks and runs these on a thread pool).

A chunk is transformed (see ``byte_group``; BF16/F32 through the compiled kernels of
``float_jit`` where numba is installed, which write the same streams) into a few byte
streams, each stream is zstd-compressed or kept raw when zstd would not gain, and the chunk is
stored self-describing and checksummed.

Format 2 (written since 2026-11-26) differs from format 1 only in the BF16/F32 transform: each
chunk holds either 2 = split_float (layout 1) or 4 = split_float layout 2 (a 6-bit
exponent+mantissa symbol instead of an 8-bit one: on weights ~25% faster to decode and
slightly smaller), whichever compresses a sample of the chunk smaller. Format 1 chunks are
always layout 1; both formats are read, and the fixtures in ``tests/fixtures/zstd_chunks_v1``
keep format 1 readable.

Format 3 (written since 2026-11-27) differs from format 2 only in how a zstd stream is checked
(``zstd_stream``): mode 2, the frame without zstd's XXH64 content checksum, preceded by 32 bits
of xxh3 of the decoded stream (the same check, 2.5x cheaper: ~12% of a BF16 chunk's decode).
Formats 1 and 2 (mode 1 frames) stay readable: ``tests/fixtures/zstd_chunks_v2``.

Stored chunk (all integers little-endian)::

    offset  size  field
    0       1     format version (1, 2 or 3)
    1       1     transform: 0 = none (1-byte elements), 1 = byte_group, 2 = split_float,
                  3 = rotate_left1 then byte_group (F16), 4 = split_float layout 2 (formats 2-3)
    2       1     itemsize of the entry's dtype
    3       1     S = number of streams (the last one is the tail: raw_len % itemsize bytes)
    4       4     raw_len (bytes this chunk decodes to)
    8       2     base exponent (split_float, both layouts; 0 otherwise)
    10      5*S   per stream: mode u8 (0 = raw bytes, 1 = one zstd frame with its content
                  checksum: formats 1-2, 2 = xxh3 digest u32 + one zstd frame: format 3),
                  stored length u32
    ...           the S stream payloads, back to back
    end-8   8     xxh3_64 of every byte before it

Every zstd frame carries its content size, and its decoded bytes are checked (zstd's content
checksum in formats 1-2, a stored xxh3 digest in format 3), so a decoder bug or a corrupt frame
is caught even where the trailer would not be; the trailer covers every stored byte before it.
Any failure raises ``CorruptCheckpoint`` naming the chunk index; the shard reader adds the file
and entry name.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import xxhash

from dist_ckpt.errors import IncompatibleCheckpoint
from dist_ckpt.format import byte_group as bg
from dist_ckpt.format import dtypes as dt
from dist_ckpt.format import float_jit
from dist_ckpt.format.dtypes import BY_SAFETENSORS, safetensors_itemsize
from dist_ckpt.format.zstd_stream import (  # noqa: F401  (MODE_*: the stream modes, read by tests)
    MODE_RAW,
    MODE_ZSTD,
    MODE_ZSTD_XXH3,
    MODES_BY_VERSION,
    corrupt,
    declared_size,
    pack_stream,
    stored_size,
    unpack_stream,
)

FORMAT_VERSION = 3  # written; READABLE_VERSIONS are read
READABLE_VERSIONS = (1, 2, 3)
CHUNK_BYTES_MAX = 1 << 30  # a declared raw length above this is refused before any allocation
T_NONE, T_GROUP, T_SPLIT, T_ROT_GROUP, T_SPLIT6 = 0, 1, 2, 3, 4
HEAD = struct.Struct("<BBBBIH")
STREAM = struct.Struct("<BI")
TRAILER = struct.Struct("<Q")
# A strided sample of every BF16/F32 chunk of 4 Ki elements or more is compressed in both float
# layouts to pick one: a 32nd of the chunk within [2 Ki, 64 Ki] elements (the trial costs a
# few % of the encode). Smaller chunks keep layout 1 (format 1's streams).
_LAYOUT_TRIAL_MIN = 4096
_LAYOUT_SAMPLE_MIN, _LAYOUT_SAMPLE_MAX, _LAYOUT_SAMPLE_SHARE = 2048, 65536, 32


# --- scratch buffers --------------------------------------------------------------------------

_idle_work: list[bg.Workspace] = []
_work_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child may inherit the lock held by a thread that no longer exists."""
    global _work_lock
    _idle_work.clear()
    _work_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def _borrowed_workspace() -> Iterator[bg.Workspace]:
    """Scratch buffers for one chunk (~6x its raw size for BF16/F32), from a free list: reused
    chunk after chunk (fresh multi-MB numpy temporaries page-fault: 10x the arithmetic), yet
    never more of them than chunks in flight, and dropped by :func:`release_buffers`."""
    work = _take_workspace()
    try:
        yield work
    finally:
        _give_workspace(work)


def _take_workspace() -> bg.Workspace:
    with _work_lock:
        return _idle_work.pop() if _idle_work else bg.Workspace()


def _give_workspace(work: bg.Workspace) -> None:
    with _work_lock:
        _idle_work.append(work)


def release_buffers() -> None:
    """Free the idle scratch buffers (after a save or load, to give the memory back; see
    :func:`dist_ckpt.api.release_codec_buffers`). Buffers of chunks in flight stay theirs."""
    with _work_lock:
        _idle_work.clear()


def idle_buffer_bytes() -> int:
    """Bytes held by the idle scratch buffers (what :func:`release_buffers` gives back)."""
    with _work_lock:
        return sum(work.nbytes for work in _idle_work)


# --- transforms -------------------------------------------------------------------------------

# transform ids by format version (only the float split changed)
_TRANSFORM_IDS = {
    1: {dt.NONE: T_NONE, dt.GROUP: T_GROUP, dt.SPLIT: T_SPLIT, dt.ROT_GROUP: T_ROT_GROUP},
    2: {dt.NONE: T_NONE, dt.GROUP: T_GROUP, dt.SPLIT: T_SPLIT6, dt.ROT_GROUP: T_ROT_GROUP},
}
_TRANSFORM_IDS[3] = _TRANSFORM_IDS[2]  # format 3 changed the stream modes only


def transform_of(dtype: str, version: int = FORMAT_VERSION) -> tuple[int, int]:
    """(transform id, itemsize) for a safetensors dtype in chunks of format ``version``."""
    itemsize = safetensors_itemsize(dtype)
    return _TRANSFORM_IDS[version][BY_SAFETENSORS[dtype].transform], itemsize


def _stream_count(transform: int, itemsize: int) -> int:
    """Streams in a chunk, the tail stream included."""
    if transform == T_NONE:
        return 2
    if transform == T_SPLIT:
        return len(bg.split_float_sizes(itemsize, 0, 0)) + 1
    if transform == T_SPLIT6:
        return len(bg.split_float6_sizes(itemsize, 0, 0)) + 1
    return itemsize + 1


def _split_float(transform: int, whole: np.ndarray, itemsize: int, work: bg.Workspace) -> tuple[int, list[np.ndarray]]:
    if transform == T_SPLIT:
        return (float_jit.split_float if float_jit.AVAILABLE else bg.split_float)(whole, itemsize, work)
    return (float_jit.split_float6 if float_jit.AVAILABLE else bg.split_float6)(whole, itemsize, work)


def _choose_split(whole: np.ndarray, itemsize: int, level: int, work: bg.Workspace) -> int:
    """The float layout whose symbols compress smaller on a strided sample of the chunk: layout 2
    on weights (its symbols also decode faster), layout 1 where the top mantissa bits carry
    information in the context of the exponent (e.g. early AdamW state). Both paths (numba,
    numpy) make the same streams, so they decide alike and write the same chunks."""
    words = whole.view(f"<u{itemsize}")
    n = words.size
    if n < _LAYOUT_TRIAL_MIN:  # a trial would cost more than the chunk could gain
        return T_SPLIT
    sample_size = min(_LAYOUT_SAMPLE_MAX, max(_LAYOUT_SAMPLE_MIN, n // _LAYOUT_SAMPLE_SHARE))
    sample = np.ascontiguousarray(words[:: max(1, n // sample_size)]).view(np.uint8)
    _, one = _split_float(T_SPLIT, sample, itemsize, work)
    size_one = stored_size(one[0], level)
    _, two = _split_float(T_SPLIT6, sample, itemsize, work)
    size_two = stored_size(two[0], level) + stored_size(two[-1], level)
    return T_SPLIT if size_one < size_two else T_SPLIT6


# --- encode -----------------------------------------------------------------------------------


def encode_chunk(piece: memoryview, dtype: str, level: int) -> bytes:
    """Transform and compress one chunk (whole elements, plus a partial tail in the last one)."""
    with _borrowed_workspace() as work:  # the streams may live in it until the join below
        return _encode_chunk(piece, dtype, level, work)


def _encode_chunk(piece: memoryview, dtype: str, level: int, work: bg.Workspace) -> bytes:
    transform, itemsize = transform_of(dtype)
    body = np.frombuffer(piece, dtype=np.uint8)
    n = body.size // itemsize
    whole = body[: n * itemsize]
    base = 0
    if transform == T_NONE:
        streams = [body]
    elif transform == T_SPLIT6:  # format 2 picks the float layout chunk by chunk
        transform = _choose_split(whole, itemsize, level, work)
        base, streams = _split_float(transform, whole, itemsize, work)
    else:
        if transform == T_ROT_GROUP:
            words = whole.view("<u2")
            whole = bg.rotate_left1(words, out=work.get("rotated", n, "<u2"), work=work).view(np.uint8)
        planes = bg.byte_group(whole, itemsize, work)
        streams = [planes[j * n : (j + 1) * n] for j in range(itemsize)]
    tail = body[n * itemsize :] if transform != T_NONE else body[:0]
    packed = [pack_stream(s, level) for s in streams] + [(MODE_RAW, [tail])]
    parts: list[bytes | np.ndarray] = [HEAD.pack(FORMAT_VERSION, transform, itemsize, len(packed), body.size, base)]
    parts += [STREAM.pack(mode, sum(len(piece) for piece in pieces)) for mode, pieces in packed]
    parts += [piece for _, pieces in packed for piece in pieces]
    digest = xxhash.xxh3_64()
    for part in parts:  # hashing the parts spares one copy of the whole chunk
        digest.update(part)
    parts.append(TRAILER.pack(digest.intdigest()))
    return b"".join(parts)


# --- decode -----------------------------------------------------------------------------------


def check_raw_len(index: int, raw_len: int) -> None:
    if not 0 <= raw_len <= CHUNK_BYTES_MAX:
        raise corrupt(index, f"declared raw length {raw_len} is outside [0, {CHUNK_BYTES_MAX}]; refusing to allocate")


def decode_chunk_into(stored: bytes | memoryview, raw_len: int, dtype: str, dst: np.ndarray, index: int = 0) -> None:
    """Decode one stored chunk into ``dst`` (uint8, ``raw_len`` long); raises CorruptCheckpoint."""
    work = _take_workspace()  # not the context manager: its cost shows on chunks of small tensors
    try:
        _decode_chunk_into(stored, raw_len, dtype, dst, index, work)
    finally:
        _give_workspace(work)


def _decode_chunk_into(
    stored: bytes | memoryview, raw_len: int, dtype: str, dst: np.ndarray, index: int, work: bg.Workspace
) -> None:
    check_raw_len(index, raw_len)
    if dst.size != raw_len:
        raise ValueError(f"chunk {index}: output buffer holds {dst.size} bytes, the chunk decodes to {raw_len}")
    itemsize = safetensors_itemsize(dtype)
    view = memoryview(stored).cast("B")
    fixed = HEAD.size + TRAILER.size
    if len(view) < fixed:
        raise corrupt(index, f"truncated: {len(view)} bytes, shorter than a chunk's {fixed}-byte header and trailer")
    body = view[: -TRAILER.size]
    (want,) = TRAILER.unpack(view[-TRAILER.size :])
    found = xxhash.xxh3_64_intdigest(body)
    if found != want:
        what = f"checksum mismatch (expected xxh3_64 {want:016x}, found {found:016x}), truncated or altered"
        raise corrupt(index, what)
    version, t, isz, nstreams, hdr_raw, base = HEAD.unpack(body[: HEAD.size])
    if version > max(READABLE_VERSIONS):  # a newer writer, not damage: say what to do
        raise IncompatibleCheckpoint(
            f"chunk {index}: zstd chunk format version {version}; this build of dist_ckpt reads versions "
            f"{READABLE_VERSIONS}: the checkpoint was written by a newer dist_ckpt, upgrade to read it"
        )
    if version not in READABLE_VERSIONS:
        raise corrupt(index, f"format version {version}, this build reads versions {READABLE_VERSIONS}")
    transform, itemsize = transform_of(dtype, version)
    if transform == T_SPLIT6 and t == T_SPLIT:  # format 2 holds either float layout
        transform = T_SPLIT
    if (t, isz) != (transform, itemsize):
        raise corrupt(index, f"transform {t}/itemsize {isz}, expected {transform}/{itemsize} for dtype {dtype}")
    if hdr_raw != raw_len:
        raise corrupt(index, f"decodes to {hdr_raw} bytes but the chunk table says {raw_len}")
    pos = HEAD.size + nstreams * STREAM.size
    if nstreams < 1 or pos > len(body):
        raise corrupt(index, f"bad stream count {nstreams}")
    table = list(STREAM.iter_unpack(body[HEAD.size : pos]))
    listed = sum(length for _, length in table)
    if pos + listed != len(body):
        raise corrupt(index, f"stream lengths sum to {listed}, the chunk holds {len(body) - pos}")
    payloads = []
    for _, length in table:
        payloads.append(body[pos : pos + length])
        pos += length
    n = raw_len // itemsize
    tail_len = raw_len - n * itemsize if transform != T_NONE else 0

    modes = MODES_BY_VERSION[version]

    def stream(i: int, expected: int) -> np.ndarray:
        return unpack_stream(index, i, table[i][0], payloads[i], expected, modes)

    expect_streams = _stream_count(transform, itemsize)
    if nstreams != expect_streams:
        raise corrupt(index, f"{nstreams} streams, expected {expect_streams}")
    whole = dst[: n * itemsize]
    if transform == T_NONE:
        dst[:raw_len] = stream(0, raw_len)
    elif transform in (T_SPLIT, T_SPLIT6):
        if base > 256 - 15:
            raise corrupt(index, f"base exponent {base} out of range")
        symbols = stream(0, n)
        if float_jit.AVAILABLE:  # the kernel counts the escapes while merging: no pass of its own
            n_escapes = declared_size(index, 1, table[1][0], payloads[1], modes)
            if not 0 <= n_escapes <= n:
                raise corrupt(index, f"stream 1 declares {n_escapes} escapes for {n} elements")
        elif transform == T_SPLIT:
            n_escapes = bg.count_escapes(symbols)
        else:
            n_escapes = bg.count_escapes6(symbols)
        size_of = bg.split_float_sizes if transform == T_SPLIT else bg.split_float6_sizes
        sizes = size_of(itemsize, n, n_escapes)
        streams = [symbols] + [stream(i, sizes[i]) for i in range(1, len(sizes))]
        _merge_float(index, transform, base, streams, itemsize, whole, work)
    else:
        grid = whole.reshape(n, itemsize)
        for j in range(itemsize):
            grid[:, j] = stream(j, n)
        if transform == T_ROT_GROUP:
            words = whole.view("<u2")
            bg.rotate_right1(words, out=words, work=work)
    if tail_len or table[-1] != (MODE_RAW, 0):  # an empty raw tail (most chunks) has nothing to check
        dst[raw_len - tail_len : raw_len] = stream(nstreams - 1, tail_len)


def _merge_float(
    index: int,
    transform: int,
    base: int,
    streams: list[np.ndarray],
    itemsize: int,
    whole: np.ndarray,
    work: bg.Workspace,
) -> None:
    if not float_jit.AVAILABLE:
        merge = bg.merge_float if transform == T_SPLIT else bg.merge_float6
        merge(base, streams, itemsize, whole, work)
        return
    merge_jit = float_jit.merge_float if transform == T_SPLIT else float_jit.merge_float6
    found = merge_jit(base, streams, itemsize, whole)
    if found != streams[1].size:
        seen = "more than" if found < 0 else str(found)
        raise corrupt(index, f"the symbols call for {seen} escapes, stream 1 holds {streams[1].size}")
