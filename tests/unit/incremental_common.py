"""A frozen base + small trainable adapter, shared by the incremental-checkpoint tests."""

from __future__ import annotations

import copy
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn


class Adapted(nn.Module):
    """A frozen 512x512 base (1 MiB) and a rank-4 adapter (trainable)."""

    def __init__(self, seed: int = 0, width: int = 512):
        super().__init__()
        torch.manual_seed(seed)
        self.base = nn.Linear(width, width)
        self.down = nn.Linear(width, 4, bias=False)
        self.up = nn.Linear(4, width, bias=False)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class AdapterRun:
    def __init__(self, seed: int = 0):
        self.model = Adapted(seed)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)

    def objects(self) -> dict:
        return {"model": self.model, "opt": self.opt}

    def train_step(self) -> None:
        x = torch.randn(8, 512)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict())}


def assert_bit_identical(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path  # bits, NaN too
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_bit_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def stored_bytes(root, prefix: str = "step_") -> int:
    """Bytes of every file below the run root's step folders (what the run occupies)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        if Path(dirpath).relative_to(root).parts[:1] and Path(dirpath).relative_to(root).parts[0].startswith(prefix):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


class CountingReads:
    """A backend wrapper that counts the bytes read from each key."""

    def __init__(self, inner):
        self.inner, self.read_bytes = inner, Counter()

    def read(self, key, offset=0, length=None):
        data = self.inner.read(key, offset, length)
        self.read_bytes[key] += len(data)
        return data

    def read_into(self, key, offset, buf):
        n = self.inner.read_into(key, offset, buf)
        self.read_bytes[key] += n
        return n

    def __getattr__(self, name):
        return getattr(self.inner, name)
