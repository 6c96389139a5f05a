"""The rough edges a new user hit in one trial (issue 13, item 4): each test fails on the code
before the fix. The keyword-only constructor is in test_manager_keywords.py, the command line's
start-up and `export --which/--config` in tests/cli/, the once-per-rank error and once-per-job
warning under torchrun in tests/distributed/test_errors_once_per_rank.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from manager_common import FAST, assert_same, manager
from torch import nn

from dist_ckpt import CheckpointManager, CheckpointNotFound, ConfigError, IncompatibleCheckpoint
from dist_ckpt.manager import LoadedWeights

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def val_loss_run(tmp_path: Path) -> Path:
    """Steps 0..3 with val_loss 3, 1, 2, 4: best:val_loss is step 1, last is step 3."""
    root = tmp_path / "run"
    torch.manual_seed(0)
    with manager(root, best={"val_loss": "min"}, config={"hidden": 4, "lr": 0.1}) as mgr:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        state = mgr.track(model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1))
        for step, loss in enumerate([3.0, 1.0, 2.0, 4.0]):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(step))
            mgr.save(step, state, metrics={"val_loss": loss})
    return root


# -- which: pointers come from the run's manifest; unknown names list what exists -------------------
def test_best_pointer_of_the_run_without_best_option_and_a_typo_lists_the_pointers(val_loss_run: Path) -> None:
    mgr = manager(val_loss_run)  # opened without best=
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = mgr.track(model=model)
    assert mgr.restore(state, which="best:val_loss").step == 1  # the run's own pointer
    assert torch.equal(model[0].weight, torch.full((4, 3), 1.0))
    with pytest.raises(ConfigError) as typo:
        mgr.restore(state, which="best:val_los")
    msg = str(typo.value)
    assert "best={}" not in msg  # the old message blamed the manager's (empty) best option
    assert "Did you mean 'best:val_loss'?" in msg
    assert "'best:val_loss' (step 1)" in msg and "'last' (step 3)" in msg and "latest steps: 0, 1, 2, 3" in msg
    assert str(val_loss_run) in msg
    for which in ("lats", 99):
        with pytest.raises((ConfigError, CheckpointNotFound)) as unknown:
            mgr.restore(state, which=which)
        assert "'best:val_loss' (step 1)" in str(unknown.value) and "latest steps: 0, 1, 2, 3" in str(unknown.value)
    with pytest.raises(ConfigError, match="Did you mean 'last'"):
        mgr.restore(state, which="lats")
    assert torch.equal(model[0].weight, torch.full((4, 3), 1.0))  # refused restores touched nothing


# -- read-only manager on a root with no run ---------------------------------------------------------
def test_read_only_manager_on_a_root_without_a_run_raises_not_found(tmp_path: Path) -> None:
    typo = tmp_path / "rnus" / "exp1"
    reader = CheckpointManager(str(typo), read_only=True)
    state = reader.track(model=nn.Linear(2, 2))
    with pytest.raises(CheckpointNotFound, match=str(typo)):
        reader.restore(state)
    assert not typo.exists()  # nothing created
    with CheckpointManager(str(tmp_path / "new"), **FAST) as writer:  # a writing manager starts a new run
        assert writer.restore(writer.track(model=nn.Linear(2, 2))) is None


# -- load_weights(strict=False) and the hint IncompatibleCheckpoint gives ------------------------------
def _wider() -> nn.Sequential:
    """The trained model with a changed head and an extra layer."""
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


def test_restore_hint_names_config_changes_and_load_weights_strict_false_follows_it(val_loss_run: Path) -> None:
    mgr = manager(val_loss_run, config={"hidden": 4, "lr": 0.1, "head": 5})
    model = _wider()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpoint) as refused:
        mgr.restore(mgr.track(model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1)))
    msg = str(refused.value)
    assert "The run config changed since this checkpoint: head: (absent) -> 5." in msg
    assert "load_weights(model, which=..., strict=False)" in msg
    assert_same(before, model.state_dict())  # refused before anything was loaded

    # the hint is true: strict=False loads what matches and reports the rest, as nn.Module does
    with pytest.raises(IncompatibleCheckpoint) as strict:
        mgr.load_weights(model, which="best:val_loss")
    assert "missing from the checkpoint: 4.bias, 4.weight" in str(strict.value)
    assert "Pass strict=False" in str(strict.value) and "head: (absent) -> 5" in str(strict.value)
    assert_same(before, model.state_dict())
    # the layer 2 shapes differ ([2, 4] stored, [5, 4] here): strict=False skips names, not shapes
    with pytest.raises(IncompatibleCheckpoint, match=r"2.weight: checkpoint shape \[2, 4\], state shape \[5, 4\]"):
        mgr.load_weights(model, which="best:val_loss", strict=False)

    partial = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Identity(), nn.Tanh(), nn.Linear(5, 2))
    reference = {k: v.clone() for k, v in partial.state_dict().items()}
    loaded = mgr.load_weights(partial, which="best:val_loss", strict=False)
    assert isinstance(loaded, LoadedWeights) and loaded.step == 1 and int(loaded) == 1
    assert loaded.missing_keys == ("4.bias", "4.weight")
    assert loaded.unexpected_keys == ("2.bias", "2.weight")
    assert torch.equal(partial[0].weight, torch.full((4, 3), 1.0)) and torch.equal(
        partial[0].bias, torch.full((4,), 1.0)
    )
    assert torch.equal(partial[4].weight, reference["4.weight"])  # missing: left as it was
    assert loaded.uri.endswith("step_000000001")


def test_load_weights_strict_true_refuses_unexpected_keys_like_nn_module(val_loss_run: Path) -> None:
    mgr = manager(val_loss_run)
    smaller = nn.Sequential(nn.Linear(3, 4))  # the checkpoint also holds 2.weight/2.bias
    with pytest.raises(IncompatibleCheckpoint, match=r"unexpected \(not in the model\): 2.bias, 2.weight"):
        mgr.load_weights(smaller)
    result = mgr.load_weights(smaller, strict=False)
    assert result.step == 3 and result.missing_keys == () and result.unexpected_keys == ("2.bias", "2.weight")
    assert torch.equal(smaller[0].weight, torch.full((4, 3), 3.0))


# -- the README loop saves the last step ------------------------------------------------------------------
def test_readme_loop_idiom_saves_the_final_step(tmp_path: Path) -> None:
    total_steps = 10  # steps 0..9; save_every_n_steps=4 alone would save 0, 4, 8 and lose 9
    with manager(tmp_path, save_every_n_steps=4) as mgr:
        state = mgr.track(model=nn.Linear(2, 2))
        for step in range(total_steps):
            mgr.save(step, state, force=(step == total_steps - 1))
        assert [c.step for c in mgr.checkpoints()] == [0, 4, 8, 9]
