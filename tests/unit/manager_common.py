"""Helpers shared by the CheckpointManager unit tests (test_manager_*.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from dist_ckpt import CheckpointManager
from dist_ckpt import manifest as mf

FAST = {"backend_options": {"fsync": False}}


def manager(root, **options) -> CheckpointManager:
    return CheckpointManager(str(root), **{**FAST, **options})


def step_dirs(root) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith("step_"))


def steps_on_disk(root) -> list[int]:
    return [int(n[5:]) for n in step_dirs(root) if (Path(root) / n / "COMMITTED").exists()]


def read_manifest(root) -> mf.Manifest:
    return mf.loads((Path(root) / "manifest.json").read_bytes())


def my_warnings(record, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# -- a GAN: two models, two AdamW optimizers, two schedulers ---------------------------------
class Gan:
    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
        self.opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=1e-3, weight_decay=0.05)
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, step_size=2, gamma=0.5)
        self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, gamma=0.9)

    def objects(self) -> dict:
        return dict(
            generator=self.generator,
            discriminator=self.discriminator,
            opt_g=self.opt_g,
            opt_d=self.opt_d,
            sched_g=self.sched_g,
            sched_d=self.sched_d,
        )

    def train_step(self) -> float:
        real = torch.randn(16, 4) + 2.0
        fake = self.generator(torch.randn(16, 4))
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), torch.ones(16, 1)) + bce(
            self.discriminator(fake.detach()), torch.zeros(16, 1)
        )
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        g_loss = bce(self.discriminator(fake), torch.ones(16, 1))
        self.opt_g.zero_grad()
        g_loss.backward()
        self.opt_g.step()
        self.sched_g.step()
        self.sched_d.step()
        return float(g_loss.detach())

    def snapshot(self) -> dict:
        return {
            "generator": copy.deepcopy(self.generator.state_dict()),
            "discriminator": copy.deepcopy(self.discriminator.state_dict()),
            "opt_g": copy.deepcopy(self.opt_g.state_dict()),
            "opt_d": copy.deepcopy(self.opt_d.state_dict()),
            "sched_g": copy.deepcopy(self.sched_g.state_dict()),
            "sched_d": copy.deepcopy(self.sched_d.state_dict()),
        }


def assert_same(a, b, path="") -> None:
    """Deep equality; tensors bit for bit (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
