"""async_save="overlap": save() returns before parameters and optimizer state are copied; the
copy runs during the next forward/backward; the optimizer step waits for it; a tensor changed
in place before its copy fails the save (never a torn snapshot); exact resume with it on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from async_helpers import RecordingObserver, assert_same, committed_steps, shard_faults
from torch import nn

from dist_ckpt import CheckpointManager
from dist_ckpt import overlap as overlap_mod
from dist_ckpt.errors import SnapshotInconsistent

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class BNNet(nn.Module):
    """BatchNorm: its running statistics (buffers) change in forward, before the optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = BNNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def forward_backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 16)  # the global generator: RNG state is part of what must resume exactly
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()


def step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    forward_backward(model, opt)
    opt.step()
    sched.step()


def dump(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()}  # buffers included
    for i, st in enumerate(opt.state.values()):
        out.update({f"o.{i}.{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def loaded(root: Path, which: Any) -> dict[str, torch.Tensor]:
    model, opt, sched = make(seed=7)
    step(model, opt, sched)  # optimizer state to load into
    mgr = CheckpointManager(str(root), read_only=True)
    mgr.restore(mgr.track(model=model, optimizer=opt, scheduler=sched), which=which)
    mgr.close()
    return dump(model, opt)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlap_mod, "CHUNK_BYTES", 256)  # several pieces per tensor


@pytest.fixture
def between_chunks(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(fn: Any) -> None:
        monkeypatch.setattr(overlap_mod.OverlapCopy, "between_chunks", staticmethod(fn))

    return install


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_save_returns_before_the_copy_and_the_optimizer_step_waits_for_it(
    tmp_path: Path, mode: str, small_chunks: None, between_chunks: Any
) -> None:
    model, opt, sched = make()
    mgr = CheckpointManager(str(tmp_path), async_save="overlap", async_mode=mode)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    mgr._engine.observer = observer = RecordingObserver()
    step(model, opt, sched)
    gate, reached = threading.Event(), threading.Event()

    def hold(fqn: str, done: int) -> None:  # the copy stops at its first piece until released
        reached.set()
        assert gate.wait(30)

    between_chunks(hold)
    expected = dump(model, opt)
    mgr.save(1, state, force=True)  # returns although the copy is held
    assert reached.wait(30)
    engine = mgr._engine
    assert observer.submits[-1].deferred_bytes > 0
    assert not engine._job.copy.copied
    forward_backward(model, opt)  # forward/backward run meanwhile: BatchNorm statistics change
    stepped = threading.Event()
    stepper = threading.Thread(target=lambda: (opt.step(), stepped.set()))
    stepper.start()
    assert not stepped.wait(0.5), "optimizer.step() must wait for the staging copy"
    gate.set()
    stepper.join(30)
    assert stepped.is_set()
    mgr.wait()
    mgr.close()
    assert committed_steps(tmp_path) == [1]
    assert_same(loaded(tmp_path, 1), expected)  # the state at save(): buffers before this forward


@pytest.mark.parametrize(
    "when", ["mid_copy_background", "before_its_copy_training_thread", "after_save_training_thread"]
)
def test_a_tensor_changed_in_place_during_the_copy_fails_the_save(
    tmp_path: Path, when: str, small_chunks: None, between_chunks: Any
) -> None:
    model, opt, sched = make()
    mgr = CheckpointManager(str(tmp_path), backend=shard_faults(str(tmp_path)), async_save="overlap")
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    step(model, opt, sched)
    mgr.save(1, state, force=True)
    mgr.wait()
    expected_1 = dump(model, opt)
    step(model, opt, sched)
    victim = opt.state[model.b.weight]["exp_avg"]  # optimizer state, copied in pieces
    gate = threading.Event()
    copied_pieces: list[tuple[str, int]] = []

    def inject(fqn: str, done: int) -> None:
        copied_pieces.append((fqn, done))
        if (
            when == "mid_copy_background"
            and fqn.endswith("b.weight.exp_avg")
            and len([p for p in copied_pieces if p[0] == fqn]) == 1
        ):
            with torch.no_grad():
                victim.mul_(-1.0)  # between two pieces of its own copy
        if when == "before_its_copy_training_thread":
            assert gate.wait(30)

    between_chunks(inject)
    mgr.save(2, state, force=True)
    if when != "mid_copy_background":
        with torch.no_grad():
            victim.add_(1.0)  # a forward-time in-place change of optimizer state
        gate.set()
    forward_backward(model, opt)
    opt.step()  # joins the copy: the change is seen here at the latest
    with pytest.raises(SnapshotInconsistent, match=r"step 2: .*optimizer\.state\.b\.weight\.exp_avg"):
        mgr.wait()
    if when == "mid_copy_background":
        assert len([p for p in copied_pieces if p[0].endswith("b.weight.exp_avg")]) > 1  # it was copied in pieces
    assert committed_steps(tmp_path) == [1]  # step 2 left nothing visible
    assert_same(loaded(tmp_path, "last"), expected_1)
    # the manager goes on: the next save (nothing changed behind its back) commits its own state
    between_chunks(None)
    step(model, opt, sched)
    expected_3 = dump(model, opt)
    mgr.save(3, state, force=True)
    mgr.close()
    assert committed_steps(tmp_path) == [1, 3]
    assert_same(loaded(tmp_path, 3), expected_3)


def run(root: Path, steps: range, *, resume: bool, overlap: Any = "overlap") -> dict[str, torch.Tensor]:
    model, opt, sched = make()
    mgr = CheckpointManager(str(root), async_save=overlap, save_every_n_steps=3)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    if resume:
        info = mgr.restore(state)
        assert info is not None and info.step == steps.start - 1
    for i in steps:
        step(model, opt, sched)
        mgr.save(i, state)
    mgr.close()
    return {**dump(model, opt), "rng": torch.get_rng_state()}


def test_exact_resume_with_overlap(tmp_path: Path) -> None:
    reference = run(tmp_path / "ref", range(0, 10), resume=False, overlap=False)
    run(tmp_path / "run", range(0, 7), resume=False)  # saves steps 0, 3, 6
    resumed = run(tmp_path / "run", range(7, 10), resume=True)  # from step 6
    assert_same(resumed, reference)


def test_async_save_option_is_checked() -> None:
    from dist_ckpt.errors import ConfigError

    with pytest.raises(ConfigError, match="async_save='overlapped': expected True, False, 'staged' or 'overlap'"):
        CheckpointManager("/nonexistent/never-created", async_save="overlapped")
