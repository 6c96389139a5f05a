"""zstd chunk format 3: each zstd stream is a frame without zstd's content checksum behind a
32-bit xxh3 digest of its decoded bytes (stream mode 2). The committed format-3 chunks
(``tests/fixtures/zstd_chunks_v3``) decode bit for bit and are what the encoder writes today;
the digest is checked (a frame swapped for another valid frame is caught); a mode the chunk's
version cannot hold is refused; odd lengths, escapes and misaligned buffers round-trip."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zstd_codec import make_tensor, tensor_bytes
from zstd_common import as_format_3, join_chunk, split_chunk

from dist_ckpt.errors import CorruptCheckpoint, IncompatibleCheckpoint
from dist_ckpt.format import float_jit
from dist_ckpt.format import zstd_chunk as zch
from dist_ckpt.format.zstd_codec import ZstdCodec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DTYPES = ["F32", "BF16", "F16", "I64", "U8"]
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-41, 3e38, -1e-30]


def _maker():  # noqa: ANN202
    path = FIXTURES / "zstd_chunks_v3" / "make_fixture.py"
    spec = importlib.util.spec_from_file_location("make_fixture_v3", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored(version: int, dtype: str) -> tuple[list[bytes], list[int]]:
    folder = FIXTURES / f"zstd_chunks_v{version}"
    raw_lens = json.loads((folder / "index.json").read_text())[dtype]
    return [(folder / f"{dtype}.{i}.chunk").read_bytes() for i in range(len(raw_lens))], raw_lens


def _decode(stored: list[bytes], raw_lens: list[int], dtype: str, threads: int = 1) -> bytes:
    out = bytearray(sum(raw_lens))
    ZstdCodec(threads=threads).decode_into(stored, raw_lens, dtype, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_format_3_fixtures_decode_and_are_what_the_encoder_writes(
    dtype: str, use_numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    stored, raw_lens = _stored(3, dtype)
    assert all(s[0] == 3 for s in stored)  # format version byte
    maker = _maker()
    raw = maker.raw_values(dtype)
    assert _decode(stored, raw_lens, dtype, threads=2) == raw
    codec = ZstdCodec(level=1, chunk_bytes=maker.CHUNK_BYTES, threads=1)
    assert [c for c, _ in codec.encode(memoryview(raw), dtype)] == stored
    # Same values as the format-2 fixtures: the same streams, only the checks of the frames differ.
    old, _ = _stored(2, dtype)
    assert [as_format_3(c) for c in old] == stored
    assert sum(map(len, stored)) == sum(map(len, old))  # 4 digest bytes for zstd's 4 checksum bytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_zstd_stream_is_a_mode_2_frame_with_the_digest_of_its_bytes(dtype: str) -> None:
    stored, _ = _stored(3, dtype)
    frames = 0
    for chunk in stored:
        _, table, payloads = split_chunk(chunk)
        assert {mode for mode, _ in table} <= {zch.MODE_RAW, zch.MODE_ZSTD_XXH3}
        for (mode, _), payload in zip(table, payloads):
            if mode == zch.MODE_ZSTD_XXH3:
                frames += 1
                frame = payload[4:]
                assert not zstandard.get_frame_parameters(frame).has_checksum
                decoded = zstandard.ZstdDecompressor().decompress(frame)
                (digest,) = struct.unpack_from("<I", payload)
                assert digest == xxhash.xxh3_64_intdigest(decoded) & 0xFFFFFFFF
    assert frames > 0


def _bad_frame_chunk(dtype: str, change: str) -> tuple[bytes, int]:
    """The first format-3 fixture chunk with its first zstd stream damaged, the trailer
    recomputed (so only the digest check can catch it): ``digest`` flips a bit of the stored
    digest; ``swap`` replaces the frame with a valid frame of other bytes of the same length."""
    stored, raw_lens = _stored(3, dtype)
    head, table, payloads = split_chunk(stored[0])
    which = next(i for i, (mode, _) in enumerate(table) if mode == zch.MODE_ZSTD_XXH3)
    payload = payloads[which]
    if change == "digest":
        payloads[which] = bytes([payload[0] ^ 0x10]) + payload[1:]
    else:
        decoded = bytearray(zstandard.ZstdDecompressor().decompress(payload[4:]))
        decoded[len(decoded) // 2] ^= 0x01  # a symbol one off: a plausible, wrong value
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=False, write_content_size=True)
        payloads[which] = payload[:4] + cctx.compress(bytes(decoded))
    return join_chunk(head, table, payloads), raw_lens[0]


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("change", ["digest", "swap"])
@pytest.mark.parametrize("dtype", ["BF16", "F32", "I64"])
def test_a_frame_that_does_not_match_its_digest_is_corruption(
    dtype: str, change: str, use_numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    bad, raw_len = _bad_frame_chunk(dtype, change)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 5\b") as caught:
        ZstdCodec(threads=1).decode_chunk(bad, raw_len, dtype, index=5)
    assert "xxh3" in str(caught.value)


def test_a_digest_cut_short_is_corruption() -> None:
    stored, raw_lens = _stored(3, "I64")
    head, table, payloads = split_chunk(stored[0])
    which = next(i for i, (mode, _) in enumerate(table) if mode == zch.MODE_ZSTD_XXH3)
    payloads[which] = payloads[which][:3]
    with pytest.raises(CorruptCheckpoint, match=r"chunk 0\b"):
        ZstdCodec(threads=1).decode_chunk(join_chunk(head, table, payloads), raw_lens[0], "I64")


@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
def test_a_mode_2_frame_in_a_format_2_chunk_is_refused(dtype: str) -> None:
    """Format 2 never held mode 2: a chunk relabelled as format 2 is refused, not misread."""
    stored, raw_lens = _stored(3, dtype)
    head, table, payloads = split_chunk(stored[0])
    with pytest.raises(CorruptCheckpoint, match=r"chunk 0: stream \d+ has mode 2"):
        ZstdCodec(threads=1).decode_chunk(join_chunk(bytes([2]) + head[1:], table, payloads), raw_lens[0], dtype)


def test_a_chunk_of_a_newer_format_asks_for_an_upgrade_and_version_0_is_corruption() -> None:
    """A format this build does not know yet was written by a newer dist_ckpt: the error says
    so (not "damaged"); a version below every format is damage."""
    stored, raw_lens = _stored(3, "BF16")
    head, table, payloads = split_chunk(stored[0])
    newer = join_chunk(bytes([max(zch.READABLE_VERSIONS) + 1]) + head[1:], table, payloads)
    with pytest.raises(IncompatibleCheckpoint, match=r"chunk 0: zstd chunk format version \d+.*newer dist_ckpt"):
        ZstdCodec(threads=1).decode_chunk(newer, raw_lens[0], "BF16")
    with pytest.raises(CorruptCheckpoint, match=r"chunk 0: format version 0"):
        ZstdCodec(threads=1).decode_chunk(join_chunk(bytes([0]) + head[1:], table, payloads), raw_lens[0], "BF16")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(["BF16", "F32", "F16", "I64"]),
    n=st.integers(1, 9000),
    in_offset=st.integers(0, 7),
    out_offset=st.integers(0, 7),
    chunk_bytes=st.sampled_from([999, 4096, 1 << 16]),
    seed=st.integers(0, 2**31),
)
def test_odd_lengths_escapes_and_misaligned_buffers_round_trip(
    dtype: str, n: int, in_offset: int, out_offset: int, chunk_bytes: int, seed: int
) -> None:
    """Weights-like values with zeros, infinities, NaN and denormals (escaped exponents) at
    random places, any length, read from and decoded into buffers at any byte offset."""
    t = make_tensor(dtype, n, seed, "normal")
    if t.dtype.is_floating_point:
        gen = torch.Generator().manual_seed(seed)
        where = torch.randint(0, n, (min(n, 40),), generator=gen)
        t[where] = torch.tensor([SPECIALS[i % len(SPECIALS)] for i in range(where.numel())]).to(t.dtype)
    raw = tensor_bytes(t)
    source = bytearray(in_offset) + raw
    codec = ZstdCodec(chunk_bytes=chunk_bytes, threads=1)
    chunks = list(codec.encode(memoryview(source)[in_offset:], dtype))
    assert all(c[0] == zch.FORMAT_VERSION == 3 for c, _ in chunks)
    backing = bytearray(len(raw) + out_offset)
    out = memoryview(backing)[out_offset:]
    codec.decode_into([c for c, _ in chunks], [r for _, r in chunks], dtype, out)
    assert bytes(out) == raw
    assert np.array_equal(np.frombuffer(out, np.uint8), np.frombuffer(raw, np.uint8))
