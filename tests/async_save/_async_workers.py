"""Per-rank bodies of test_async_multirank.py (run through support.dist.run_ranks)."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from async_helpers import children_of, committed_steps, shard_faults, shm_entries
from torch import nn
from torch.distributed.fsdp import fully_shard

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import StorageError, UnsupportedValue


class Extra:
    """A Stateful whose state can turn unstorable (a set is not JSON)."""

    bad = False

    def state_dict(self) -> dict[str, Any]:
        return {"v": {1, 2} if self.bad else [1, 2]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))  # 3 rows: uneven FSDP shards
    if kind == "fsdp":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    x = torch.randn(4, 16) + rank
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _local(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's tensors (local shards of DTensors), cloned."""
    out = {}
    for k, v in model.state_dict().items():
        out[f"p.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"o.{i}.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
    return out


def _restore_equals(root: str, kind: str, step: int, expected: dict[str, torch.Tensor], rank: int) -> bool:
    model = _model(kind, seed=123)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, rank)
    mgr = CheckpointManager(root, read_only=True)
    mgr.restore(mgr.track(model=model, optimizer=opt, extra=Extra()), which=step)
    mgr.close()
    got = _local(model, opt)
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def failure_and_preemption(rank: int, world: int, root: str, kind: str, mode: str) -> dict[str, Any]:
    """Saves 1 and 2 commit (same staging buffer); rank 1's shard of save 3 fails in the
    background; save 4 raises on both ranks; rank 1 gets SIGTERM and should_stop() turns
    True on both; the final save commits; close() leaves no child or /dev/shm segment."""
    me, shm_before, kids_before = os.getpid(), shm_entries(), set(children_of(os.getpid()))
    backend = shard_faults(root, fail_at=3 if rank == 1 else None)
    # "staged": parameters are changed in place right after save() (overlapped staging, the
    # default, fails such a save instead: test_overlap_default.py)
    mgr = CheckpointManager(root, backend=backend, async_save="staged", async_mode=mode, save_on_sigterm=True)
    writer_pid = mgr._engine.process.pid if mode == "process" else None
    model = _model(kind, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = Extra()
    state = mgr.track(model=model, optimizer=opt, extra=extra)
    out: dict[str, Any] = {"pointers": [], "restored": {}}
    expected = {}
    for step in (1, 2):
        _step(model, opt, rank)
        expected[step] = _local(model, opt)
        assert mgr.save(step, state, force=True)
        out["pointers"].append(sorted(t.data_ptr() for t in mgr._engine.stager.staged().values()))
        with torch.no_grad():  # in-place changes right after save() returns must not leak
            for p in model.parameters():
                p.mul_(-3.0)
    out["allocations"] = mgr._engine.stager.allocations
    _step(model, opt, rank)
    mgr.save(3, state, force=True)  # rank 1's shard fails in the background
    _step(model, opt, rank)
    try:
        mgr.save(4, state, force=True)
        out["error"] = None
    except StorageError as e:
        out["error"] = str(e)
    out["committed_after_failure"] = committed_steps(root)
    out["last_after_failure"] = [c.step for c in mgr.checkpoints() if "last" in c.pointers]
    out["stop_before"] = mgr.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is preempted
    out["stop_after"] = mgr.should_stop()
    expected[5] = _local(model, opt)
    assert mgr.save(5, state, force=True)
    # a value that cannot be stored, on rank 1 only: the save fails on both, at the next call
    extra.bad = rank == 1
    assert mgr.save(6, state, force=True)
    try:
        mgr.wait()
        out["value_error"] = None
    except UnsupportedValue as e:
        out["value_error"] = str(e)
    mgr.close()  # what exit_after_preemption() does before exiting
    out["committed_final"] = committed_steps(root)
    for step in (1, 2, 5):
        out["restored"][step] = _restore_equals(root, kind, step, expected[step], rank)
    out["writer_alive"] = writer_pid is not None and os.path.exists(f"/proc/{writer_pid}")
    out["children_left"] = sorted(set(children_of(me)) - kids_before)
    out["shm_left"] = sorted(shm_entries() - shm_before)
    out["handler_restored"] = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    dist.barrier()
    return out


class Blob:
    """A Stateful with a rank-dependent amount of tensor data."""

    def __init__(self, numel: int):
        self.t = torch.arange(numel, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t.copy_(sd["t"])


def staging_budget(rank: int, world: int, root: str, mode: str) -> dict[str, Any]:
    """Rank 0 holds 64 KiB of tensors, rank 1 4 KiB, the budget is 16 KiB: rank 0 saves
    synchronously (committed when save() returns), rank 1 in the background."""
    blob = Blob(16384 if rank == 0 else 1024)
    mgr = CheckpointManager(root, async_save=True, async_mode=mode, max_staging_bytes=16384)
    state = mgr.track(**{f"blob{rank}": blob})
    out: dict[str, Any] = {"committed_at_return": [], "buffer": []}
    for step in (1, 2):
        blob.t.add_(step)
        assert mgr.save(step, state, force=True)
        out["committed_at_return"].append(os.path.exists(f"{root}/step_{step:09d}/COMMITTED"))
        out["buffer"].append(mgr._engine.stager.buffer is not None)
        expected = blob.t.clone()
        blob.t.mul_(-1)  # in place, right after save() returns
        mgr.wait()
        blob.t.copy_(expected)
    mgr.close()
    check = Blob(blob.t.numel())
    reader = CheckpointManager(root, read_only=True)
    reader.restore(reader.track(**{f"blob{rank}": check}), which=2)
    reader.close()
    out["restored"] = torch.equal(check.t, expected)
    out["committed"] = committed_steps(root)
    return out
