"""One zstd level check (dist_ckpt.format.zstd_level) behind both places that take a level:
``ManagerConfig(compression_level=...)`` and ``ZstdCodec(level=...)`` accept the same range —
the levels zstd itself accepts — and refuse the rest with an error naming their option."""

from __future__ import annotations

import re

import pytest
import zstandard

from dist_ckpt import ConfigError, ManagerConfig
from dist_ckpt.format.zstd_codec import ZstdCodec
from dist_ckpt.format.zstd_level import MAX_LEVEL, MIN_LEVEL

ACCEPTED = [MIN_LEVEL, -131071, -100, -8, -7, -1, 0, 1, 3, 19, MAX_LEVEL]
REFUSED = [MIN_LEVEL - 1, MAX_LEVEL + 1, 99, 1.5, "3", None]


def test_the_range_is_zstds() -> None:
    assert MAX_LEVEL == zstandard.MAX_COMPRESSION_LEVEL == 22
    assert MIN_LEVEL == -131072  # ZSTD_minCLevel()
    with pytest.raises(ValueError):  # what zstandard itself refuses
        zstandard.ZstdCompressor(level=MAX_LEVEL + 1)


@pytest.mark.parametrize("level", ACCEPTED)
def test_both_entry_points_accept_every_zstd_level(level: int) -> None:
    assert ManagerConfig(compression="zstd", compression_level=level).compression_level == level
    codec = ZstdCodec(level=level, chunk_bytes=4096, threads=1)
    raw = bytes(range(256)) * 64
    out = bytearray(len(raw))
    chunks = list(codec.encode(memoryview(raw), "U8"))  # zstd really compresses at this level
    codec.decode_into([c for c, _ in chunks], [n for _, n in chunks], "U8", memoryview(out))
    assert out == raw


@pytest.mark.parametrize("level", REFUSED, ids=repr)
def test_both_entry_points_refuse_the_rest_naming_their_option(level: object) -> None:
    expected = f"[{MIN_LEVEL}, {MAX_LEVEL}]"
    with pytest.raises(ConfigError, match=re.escape(f"compression_level={level!r}: expected an int in {expected}")):
        ManagerConfig(compression_level=level)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^" + re.escape(f"level={level!r}: expected an int in {expected}")):
        ZstdCodec(level=level)  # type: ignore[arg-type]
