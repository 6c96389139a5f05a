"""Chunks of zstd format 2 written by the codec that introduced it (``tests/fixtures/
zstd_chunks_v2``, made by main at ae17614) decode bit for bit, with and without numba: a
faster decoder must read what is already on disk, escapes (zeros, outliers, infinities, NaN,
denormals) included, and a damaged fixture stream is reported as corruption."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import xxhash
from zstd_common import as_format_3

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format import float_jit
from dist_ckpt.format import zstd_chunk as zch
from dist_ckpt.format.zstd_codec import ZstdCodec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "zstd_chunks_v2"
DTYPES = ["F32", "BF16", "F16", "I64", "U8"]


def _maker():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("make_fixture_v2", FIXTURES / "make_fixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored(dtype: str) -> tuple[list[bytes], list[int]]:
    raw_lens = json.loads((FIXTURES / "index.json").read_text())[dtype]
    return [(FIXTURES / f"{dtype}.{i}.chunk").read_bytes() for i in range(len(raw_lens))], raw_lens


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_format_2_fixtures_decode(dtype: str, use_numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    stored, raw_lens = _stored(dtype)
    assert all(s[0] == 2 for s in stored)  # format version byte
    if dtype in ("F32", "BF16"):
        assert stored[0][1] == zch.T_SPLIT6, "the fixture must hold a layout-2 chunk"
    maker = _maker()
    raw = maker.raw_values(dtype)
    codec = ZstdCodec(level=1, chunk_bytes=maker.CHUNK_BYTES, threads=2)
    out = bytearray(sum(raw_lens))
    codec.decode_into(stored, raw_lens, dtype, memoryview(out))
    assert bytes(out) == raw
    # The encoder changed only the checks of its zstd frames (format 3): today's chunks are the
    # committed ones, byte for byte, once rewritten with format 3's checks.
    assert [c for c, _ in codec.encode(memoryview(raw), dtype)] == [as_format_3(c) for c in stored]


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_a_damaged_layout_2_stream_is_corruption(dtype: str) -> None:
    """The escape stream (a zstd frame) of a committed layout-2 chunk altered, the trailer
    recomputed to match: CorruptCheckpoint naming the chunk, never values decoded with the
    wrong exponents."""
    stored, raw_lens = _stored(dtype)
    chunk = stored[0]
    nstreams = chunk[3]
    table = [zch.STREAM.unpack_from(chunk, zch.HEAD.size + i * zch.STREAM.size) for i in range(nstreams)]
    assert table[1][0] == zch.MODE_ZSTD, "the fixture's first chunk must hold a zstd frame of escapes"
    body = bytearray(chunk[:-8])
    at = zch.HEAD.size + nstreams * zch.STREAM.size + table[0][1]  # start of stream 1 (escapes)
    body[at + table[1][1] // 2] ^= 0x40  # inside the frame
    bad = bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body)))
    codec = ZstdCodec(threads=1)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 7\b"):
        codec.decode_chunk(bad, raw_lens[0], dtype, index=7)
