"""The one check of a zstd compression level, for every place that takes one.

``CheckpointConfig(compression_level=...)`` and ``ZstdCodec(level=...)`` accept the same
range: the levels the ``zstandard`` package passes to zstd. Negative levels are zstd's fast
levels (``--fast=N``), 0 is zstd's default (3), and ``zstandard.MAX_COMPRESSION_LEVEL`` (22)
is the slowest.
"""

from __future__ import annotations

from typing import Any

import zstandard

from dist_ckpt.errors import ConfigError

# ZSTD_minCLevel(): -ZSTD_TARGETLENGTH_MAX. zstandard does not export it; below it zstd clamps.
MIN_LEVEL = -(1 << 17)
MAX_LEVEL: int = zstandard.MAX_COMPRESSION_LEVEL


def check_level(level: Any, option: str) -> int:
    """``level`` if zstd accepts it, else :class:`ConfigError` naming ``option``."""
    if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ConfigError(
            f"{option}={level!r}: expected an int in [{MIN_LEVEL}, {MAX_LEVEL}] (zstd levels: 1 is fast, "
            f"{MAX_LEVEL} the smallest output, negative levels faster still)"
        )
    return level
