"""One byte stream of a ``zstd`` chunk (``zstd_chunk``): stored raw, or as one zstd frame.

Modes (the chunk's stream table holds one per stream)::

    0  raw bytes
    1  one zstd frame with its content size and content checksum (XXH64, 4 bytes): chunk
       formats 1 and 2, read only
    2  u32 little-endian = the low 32 bits of xxh3_64 of the decoded stream, then one zstd frame
       with its content size and no content checksum (format 3, written since 2026-11-27)

Why mode 2: zstd's content checksum is XXH64, which costs as much as a fifth of decoding a
BF16 symbol stream (0.2 of ~1.1 ms per 4 MiB chunk; zstd decodes Huffman literals at ~2 GB/s,
XXH64 hashes at ~10). xxh3 checks the same decoded bytes with the same 32 bits, 2.5x faster,
on encode as on decode. The integrity check does not move away from the decoded bytes: a
decoder bug or a frame altered together with the chunk's trailer is still caught, and the
trailer (xxh3_64 of the whole stored chunk) is unchanged.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import xxhash
import zstandard

from dist_ckpt.errors import CorruptCheckpoint

MODE_RAW, MODE_ZSTD, MODE_ZSTD_XXH3 = 0, 1, 2
MODES_BY_VERSION = {1: (MODE_RAW, MODE_ZSTD), 2: (MODE_RAW, MODE_ZSTD), 3: (MODE_RAW, MODE_ZSTD, MODE_ZSTD_XXH3)}
DIGEST = struct.Struct("<I")
_MIN_COMPRESS = 64  # smaller streams are stored raw: a zstd frame has ~20 bytes of overhead
_MIN_GAIN = 64  # keep a zstd frame only if it saves >= 1/64 of the stream: near-random planes
#                 stored raw decode at memcpy speed

_local = threading.local()  # ZstdCompressor/ZstdDecompressor are not thread-safe: one per thread


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return cctx


def _dctx() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _digest(data: np.ndarray | bytes) -> bytes:
    return DIGEST.pack(xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF)


def corrupt(index: int, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"chunk {index}: {what}; the stored data is damaged")


# --- encode -----------------------------------------------------------------------------------


def _gaining_frame(data: np.ndarray, level: int) -> bytes | None:
    """The zstd frame of ``data`` if it is worth storing (with its digest), else None."""
    if data.size < _MIN_COMPRESS:
        return None
    frame = _cctx(level).compress(data)
    return frame if DIGEST.size + len(frame) <= data.size - data.size // _MIN_GAIN else None


def pack_stream(data: np.ndarray, level: int) -> tuple[int, list[bytes | np.ndarray]]:
    """(mode, payload pieces) of one stream: mode 2 where zstd gains, raw otherwise."""
    frame = _gaining_frame(data, level)
    return (MODE_RAW, [data]) if frame is None else (MODE_ZSTD_XXH3, [_digest(data), frame])


def stored_size(data: np.ndarray, level: int) -> int:
    """What :func:`pack_stream` would store (the layout trial: no digest is computed)."""
    frame = _gaining_frame(data, level)
    return data.size if frame is None else DIGEST.size + len(frame)


# --- decode -----------------------------------------------------------------------------------


def _frame(index: int, which: int, mode: int, payload: memoryview) -> memoryview:
    if mode == MODE_ZSTD_XXH3:
        if len(payload) < DIGEST.size:
            raise corrupt(index, f"stream {which} is {len(payload)} bytes, shorter than its {DIGEST.size}-byte digest")
        return payload[DIGEST.size :]
    return payload


def declared_size(index: int, which: int, mode: int, payload: memoryview, modes: tuple[int, ...]) -> int:
    """Bytes a stream decodes to, by its own account (raw: its length; zstd: the frame header).
    ``modes``: the modes the chunk's format version may hold."""
    if mode not in modes:
        raise corrupt(index, f"stream {which} has mode {mode}, this chunk's format holds modes {modes}")
    if mode == MODE_RAW:
        return len(payload)
    try:
        return zstandard.frame_content_size(_frame(index, which, mode, payload))
    except zstandard.ZstdError as e:
        raise corrupt(index, f"stream {which} is not a zstd frame ({e})") from e


def unpack_stream(
    index: int, which: int, mode: int, payload: memoryview, expected: int, modes: tuple[int, ...]
) -> np.ndarray:
    """The decoded bytes of one stream, checked against ``expected`` (its length) and, for a
    zstd frame, its content checksum (mode 1) or its xxh3 digest (mode 2)."""
    declared = declared_size(index, which, mode, payload, modes)
    if declared != expected:  # also refuses absurd sizes before zstd allocates them
        what = "holds" if mode == MODE_RAW else "declares"
        raise corrupt(index, f"stream {which} {what} {declared} decoded bytes, expected {expected}")
    if mode == MODE_RAW:
        return np.frombuffer(payload, dtype=np.uint8)
    try:
        data = _dctx().decompress(_frame(index, which, mode, payload), max_output_size=expected)
    except zstandard.ZstdError as e:
        raise corrupt(index, f"zstd failed on stream {which} ({e})") from e
    if len(data) != expected:
        raise corrupt(index, f"stream {which} decoded to {len(data)} bytes, expected {expected}")
    if mode == MODE_ZSTD_XXH3 and _digest(data) != payload[: DIGEST.size]:
        raise corrupt(index, f"stream {which} decoded to bytes whose xxh3 does not match the stored digest")
    return np.frombuffer(data, dtype=np.uint8)
