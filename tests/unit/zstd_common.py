"""Chunk rewriting for the zstd codec tests: format 1/2 chunks as format 3 would store them."""

from __future__ import annotations

import struct

import xxhash
import zstandard

from dist_ckpt.format import zstd_chunk as zch


def split_chunk(stored: bytes) -> tuple[bytes, list[tuple[int, int]], list[bytes]]:
    """(header, stream table, stream payloads) of a stored chunk (its trailer dropped)."""
    head = stored[: zch.HEAD.size]
    nstreams = head[3]
    table = [zch.STREAM.unpack_from(stored, zch.HEAD.size + i * zch.STREAM.size) for i in range(nstreams)]
    pos, payloads = zch.HEAD.size + nstreams * zch.STREAM.size, []
    for _, length in table:
        payloads.append(stored[pos : pos + length])
        pos += length
    return head, table, payloads


def join_chunk(head: bytes, table: list[tuple[int, int]], payloads: list[bytes]) -> bytes:
    """A chunk from its parts, the stream lengths and the trailer recomputed."""
    table = [(mode, len(payload)) for (mode, _), payload in zip(table, payloads)]
    body = head + b"".join(zch.STREAM.pack(*t) for t in table) + b"".join(payloads)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def as_format_3(stored: bytes, level: int = 1) -> bytes:
    """A format 1/2 chunk (written at ``level``) as the format-3 encoder writes the same
    streams: each zstd frame (mode 1) re-compressed without zstd's content checksum, behind the
    32-bit xxh3 digest of its decoded bytes (mode 2); the version byte 3."""
    head, table, payloads = split_chunk(stored)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    new_table, new_payloads = [], []
    for (mode, _), payload in zip(table, payloads):
        if mode == zch.MODE_ZSTD:
            decoded = zstandard.ZstdDecompressor().decompress(payload)
            digest = struct.pack("<I", xxhash.xxh3_64_intdigest(decoded) & 0xFFFFFFFF)
            mode, payload = zch.MODE_ZSTD_XXH3, digest + cctx.compress(decoded)
        new_table.append((mode, 0))
        new_payloads.append(payload)
    return join_chunk(bytes([3]) + head[1:], new_table, new_payloads)
