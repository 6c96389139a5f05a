"""Shared pieces of the dist_ckpt.save / dist_ckpt.load tests: every dtype, random bits of one, bit-exact
comparison, a round trip."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import dist_ckpt

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype`` (every byte pattern, NaNs included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN == NaN with the same payload; works for every dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def zeros_like_state(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    return None  # a value: replaced on load


def roundtrip(tmp_path: Path, state: dict, target: dict | None = None, **kw) -> dict:
    uri = str(tmp_path / "run" / "step_000000001")
    dist_ckpt.save(state, uri, **kw)
    target = zeros_like_state(state) if target is None else target
    dist_ckpt.load(target, uri)
    return target
