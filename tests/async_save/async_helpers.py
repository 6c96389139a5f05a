"""Helpers of the async-save tests: slow or failing shard writes (rules of the fault suite's
:class:`FaultyBackend`), a small training state, and probes for leftover processes and
shared-memory segments."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from support.faulty_backend import FaultyBackend, Rule
from torch import nn

from storage_backends.local import LocalBackend

SHARD_KEYS = "*/rank_*"  # data shards, not their index files (index_*) or metadata


def shard_faults(
    root: str, *, delay: float = 0.0, fail_at: int | None = None, slow_at: set[int] | None = None
) -> FaultyBackend:
    """A ``LocalBackend`` (no fsync) behind the fault suite's :class:`FaultyBackend`: shard writers
    sleep ``delay`` seconds once opened, before their first byte (with ``slow_at``, only those
    shards, 1-based), and the ``fail_at``-th shard fails to open with a :class:`BackendError`.
    Shards are counted per process (the wrapper pickles into ``async_mode="process"``'s writer)."""
    rules = []
    if fail_at is not None:
        rules.append(Rule("open_writer", SHARD_KEYS, "fail", nth=fail_at, error="BackendError", message=_FAILURE_TEXT))
    if delay:
        for nth in sorted(slow_at) if slow_at else [1]:
            count = 1 if slow_at else None
            rules.append(Rule("open_writer", SHARD_KEYS, "delay", when="after", delay=delay, nth=nth, count=count))
    return FaultyBackend(LocalBackend(root, fsync=False), rules)


_FAILURE_TEXT = "injected failure writing {key} (shard #{nth})"


class Net(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def make_state(seed: int = 0, width: int = 32) -> tuple[nn.Module, torch.optim.Optimizer, Any, dict[str, Any]]:
    torch.manual_seed(seed)
    model = Net(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    counters = {"seen": 0, "tag": "x"}
    return model, opt, sched, counters


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, counters: dict[str, Any]) -> None:
    x = torch.randn(8, model.a.in_features)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    counters["seen"] += 8


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor, cloned."""
    out = {f"p.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, (_p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"o.{i}.{k}"] = v.detach().clone()
    return out


def mutate_in_place(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1000.0)
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    v.add_(100.0) if k == "step" else v.fill_(0.5)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def committed_steps(root: str | Path) -> list[int]:
    return sorted(
        int(p.name[5:]) for p in Path(root).glob("step_*") if (p / "COMMITTED").exists() and ".tmp-" not in p.name
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` exists at all (a zombie counts as alive)."""
    return Path(f"/proc/{pid}").exists()


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


class RecordingObserver:
    """An :class:`~dist_ckpt.async_job.SaveObserver` that keeps what it is told: set it as
    ``mgr._engine.observer`` (the engine's seam for tests and benchmarks)."""

    def __init__(self) -> None:
        self.submits: list[Any] = []  # SubmitTimings, one per save() that staged
        self.jobs: list[Any] = []  # finished Jobs, in order

    def submitted(self, timings: Any) -> None:
        self.submits.append(timings)

    def finished(self, job: Any) -> None:
        self.jobs.append(job)
