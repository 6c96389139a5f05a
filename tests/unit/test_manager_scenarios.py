"""CheckpointManager in one process: the users' scenarios (GAN pair, best pointers, patience),
exact resume, retention and `which` forms."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from manager_common import FAST, Gan, assert_same, manager, my_warnings, read_manifest, step_dirs, steps_on_disk  # noqa: F401
from torch import nn

from dist_ckpt.errors import (
    CheckpointNotFound,
    ConfigError,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_gan_pair_saved_and_restored_together_from_one_step(tmp_path):
    gan = Gan(0)
    snaps = {}
    with manager(tmp_path, keep_last=10) as mgr:
        state = mgr.track(**gan.objects())
        for step in range(5):
            gan.train_step()
            assert mgr.save(step, state)
            snaps[step] = gan.snapshot()
    assert snaps[2]["opt_g"]["state"][0]["exp_avg"].abs().sum() > 0  # optimizers have real state
    assert snaps[2]["opt_g"]["param_groups"][0]["lr"] != snaps[4]["opt_g"]["param_groups"][0]["lr"]

    fresh = Gan(123)
    mgr = manager(tmp_path, keep_last=10)
    state = mgr.track(**fresh.objects())
    info = mgr.restore(state, which=2)
    assert info.step == 2
    assert_same(snaps[2], fresh.snapshot())  # every model, optimizer and scheduler from step 2
    info = mgr.restore(state)  # "last"
    assert info.step == 4
    assert_same(snaps[4], fresh.snapshot())
    # the restored optimizers still drive their own models (pairing survived the round trip)
    fresh.train_step()
    assert fresh.opt_g.state_dict()["state"][0]["step"].item() == 6


def test_resume_is_bit_exact_with_dropout_and_rng(tmp_path):
    def run(gan: Gan, steps) -> list[float]:
        out = []
        for _ in steps:
            random.random()
            np.random.rand()
            out.append(gan.train_step())
        return out

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    ref = Gan(0)
    torch.manual_seed(5)
    ref_losses = run(ref, range(6))
    ref_final = ref.snapshot()
    ref_next = (random.random(), np.random.rand(), torch.rand(1).item())

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    first = Gan(0)
    torch.manual_seed(5)
    mgr = manager(tmp_path)
    losses = run(first, range(3))
    mgr.save(2, mgr.track(**first.objects()))
    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # a new process: other RNG state

    second = Gan(77)
    mgr = manager(tmp_path)
    info = mgr.restore(mgr.track(**second.objects()))
    assert info.step == 2
    losses += run(second, range(3, 6))
    assert losses == ref_losses
    assert_same(ref_final, second.snapshot())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == ref_next


def test_new_run_restore_returns_none_and_load_weights_not_found(tmp_path):
    mgr = manager(tmp_path)
    m = nn.Linear(2, 2)
    assert mgr.restore(mgr.track(model=m)) is None
    assert mgr.checkpoints() == []
    with pytest.raises(CheckpointNotFound):
        mgr.load_weights(m)
    with pytest.raises(CheckpointNotFound):
        mgr.restore(mgr.track(model=m), which=0)


# -- best pointers, patience, resume ---------------------------------------------------------
def test_best_by_loss_and_pck_tracked_independently(tmp_path):
    m = nn.Linear(2, 2)
    reports = [(3.0, 0.2), (1.0, 0.3), (2.0, 0.9), (1.5, 0.5), (1.0, 0.9)]
    params = {}
    with manager(tmp_path, keep_last=1, best={"loss": "min", "pck": "max"}) as mgr:
        state = mgr.track(model=m)
        for step, (loss, pck) in enumerate(reports):
            with torch.no_grad():
                m.weight.fill_(step)
            params[step] = m.weight.clone()
            mgr.save(step, state, metrics={"loss": loss, "pck": pck}, epoch=step)
        assert mgr.best == {"loss": 1.0, "pck": 0.9}
        listed = {c.step: c.pointers for c in mgr.checkpoints()}
    # ties go to the earlier step; keep_last=1 keeps the newest plus the two best
    assert listed == {1: ("best:loss",), 2: ("best:pck",), 4: ("last",)}
    assert steps_on_disk(tmp_path) == [1, 2, 4]
    assert read_manifest(tmp_path).pointers == {"last": 4, "best:loss": 1, "best:pck": 2}

    mgr = manager(tmp_path, best={"loss": "min", "pck": "max"})
    state = mgr.track(model=m)
    info = mgr.restore(state, which="best:pck")
    assert (info.step, info.epoch, info.metrics) == (2, 2, {"loss": 2.0, "pck": 0.9})
    assert torch.equal(m.weight, params[2])
    assert mgr.restore(state, which="best:loss").step == 1
    assert torch.equal(m.weight, params[1])


def test_best_not_overwritten_after_resume_with_worse_metric(tmp_path):
    m = nn.Linear(2, 2)
    with manager(tmp_path, keep_last=2, best={"loss": "min"}) as mgr:
        state = mgr.track(model=m)
        for step, loss in enumerate([3.0, 1.0, 2.0, 2.5]):
            mgr.save(step, state, metrics={"loss": loss})

    mgr = manager(tmp_path, keep_last=2, best={"loss": "min"})  # a new job
    state = mgr.track(model=m)
    info = mgr.restore(state)
    assert info.step == 3 and info.best == {"loss": 1.0}
    assert mgr.best == {"loss": 1.0}
    mgr.save(4, state, metrics={"loss": 1.8})  # worse than the best, better than the last
    assert mgr.best == {"loss": 1.0}
    pointers = read_manifest(tmp_path).pointers
    assert pointers == {"last": 4, "best:loss": 1}
    assert steps_on_disk(tmp_path) == [1, 3, 4]
    mgr.save(5, state, metrics={"loss": 0.5})  # a real improvement moves it
    assert mgr.best == {"loss": 0.5}
    assert read_manifest(tmp_path).pointers == {"last": 5, "best:loss": 5}
    assert steps_on_disk(tmp_path) == [4, 5]  # the superseded best is released by retention


def test_patience_counter_restored_on_resume(tmp_path):
    m = nn.Linear(2, 2)
    with manager(tmp_path, best={"loss": "min", "pck": "max"}) as mgr:
        state = mgr.track(model=m)
        for step, loss in enumerate([1.0, 0.9, 0.95, 0.97]):
            mgr.save(step, state, metrics={"loss": loss, "pck": 0.5})
        assert mgr.epochs_without_improvement == {"loss": 2, "pck": 3}

    mgr = manager(tmp_path, best={"loss": "min", "pck": "max"})
    state = mgr.track(model=m)
    info = mgr.restore(state)
    assert info.epochs_without_improvement == {"loss": 2, "pck": 3}
    assert mgr.epochs_without_improvement == {"loss": 2, "pck": 3}
    mgr.save(4, state, metrics={"loss": 0.99, "pck": 0.6})
    assert mgr.epochs_without_improvement == {"loss": 3, "pck": 0}
    mgr.save(5, state, metrics={"loss": 0.1})  # pck not reported: its counter is left alone
    assert mgr.epochs_without_improvement == {"loss": 0, "pck": 0}
    # restoring an older checkpoint brings back that step's counters, not the latest ones
    assert manager(tmp_path, best={"loss": "min"}).restore(state, which=1).epochs_without_improvement == {
        "loss": 0,
        "pck": 1,
    }


def test_nan_metric_is_saved_but_never_best(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path, best={"loss": "min"})
    state = mgr.track(model=m)
    mgr.save(0, state, metrics={"loss": float("nan")})
    assert mgr.best == {}
    assert "best:loss" not in read_manifest(tmp_path).pointers
    with pytest.raises(CheckpointNotFound, match="loss"):
        mgr.restore(state, which="best:loss")
    mgr.save(1, state, metrics={"loss": torch.tensor(2.0)})  # 0-d tensors are numbers too
    mgr.save(2, state, metrics={"loss": np.float32(float("nan"))})
    assert mgr.best == {"loss": 2.0}
    assert read_manifest(tmp_path).pointers == {"last": 2, "best:loss": 1}
    info = manager(tmp_path, best={"loss": "min"}).restore(state)
    assert np.isnan(info.metrics["loss"]) and info.best == {"loss": 2.0}


# -- saving on an interval, retention ----------------------------------------------------------
def test_keep_last_5_with_step_interval_and_improvements(tmp_path):
    losses = {0: 5.0, 4: 1.0}  # step 4 improves between two multiples of 3; the rest is worse
    m = nn.Linear(2, 2)
    written = []
    with manager(tmp_path, keep_last=5, save_every_n_steps=3, best={"loss": "min"}) as mgr:
        state = mgr.track(model=m)
        for step in range(20):
            if mgr.save(step, state, metrics={"loss": losses.get(step, 6.0)}):
                written.append(step)
        # only multiples of 3, plus the improving steps 0 and 4
        assert written == [0, 3, 4, 6, 9, 12, 15, 18]
        # the last five written, and the best even though it is older
        assert steps_on_disk(tmp_path) == [4, 6, 9, 12, 15, 18]
        assert step_dirs(tmp_path) == [f"step_{s:09d}" for s in (4, 6, 9, 12, 15, 18)]
        assert [c.step for c in mgr.checkpoints()] == [4, 6, 9, 12, 15, 18]
        assert read_manifest(tmp_path).pointers == {"last": 18, "best:loss": 4}
        assert mgr.save(19, state, force=True)  # force writes off the interval
        assert steps_on_disk(tmp_path) == [4, 9, 12, 15, 18, 19]


def test_unsaved_steps_update_bookkeeping_but_write_nothing(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path, save_every_n_steps=10, best={"loss": "min"})
    state = mgr.track(model=m)
    assert mgr.save(0, state, metrics={"loss": 1.0})
    assert not mgr.save(1, state, metrics={"loss": 2.0})
    assert not mgr.save(2, state, metrics={"loss": 3.0})
    assert mgr.epochs_without_improvement == {"loss": 2}
    assert steps_on_disk(tmp_path) == [0]


def test_keep_every_n_steps_milestones(tmp_path):
    m = nn.Linear(2, 2)
    with manager(tmp_path, keep_last=2, keep_every_n_steps=4) as mgr:
        state = mgr.track(model=m)
        for step in range(11):
            mgr.save(step, state)
    assert steps_on_disk(tmp_path) == [0, 4, 8, 9, 10]
    assert read_manifest(tmp_path).steps() == [0, 4, 8, 9, 10]


def test_checkpoints_lists_step_epoch_metrics(tmp_path):
    m = nn.Linear(3, 3)
    mgr = manager(tmp_path, best={"val_loss": "min"}, compression="zstd")
    state = mgr.track(model=m)
    mgr.save(10, state, metrics={"val_loss": 0.5, "acc": 0.8}, epoch=1)
    mgr.save(20, state, metrics={"val_loss": 0.7, "acc": 0.9}, epoch=2)
    cps = mgr.checkpoints()
    assert [(c.step, c.epoch, c.metrics) for c in cps] == [
        (10, 1, {"val_loss": 0.5, "acc": 0.8}),
        (20, 2, {"val_loss": 0.7, "acc": 0.9}),
    ]
    assert [c.pointers for c in cps] == [("best:val_loss",), ("last",)]
    for c in cps:
        assert c.world_size == 1 and c.codec == "zstd" and c.time > 0
        files = [
            p for p in (tmp_path / f"step_{c.step:09d}").iterdir() if p.name.startswith(("rank_", "index_"))
        ]  # shards + rank indexes
        assert c.size == sum(p.stat().st_size for p in files) > 0
        assert Path(c.uri).resolve() == (tmp_path / f"step_{c.step:09d}").resolve()


# -- which -------------------------------------------------------------------------------------
@pytest.fixture
def five_steps(tmp_path):
    """A run with steps 0..6, the model's weight filled with the step number."""
    m = nn.Linear(2, 2)
    with manager(tmp_path, best={"loss": "min"}) as mgr:
        state = mgr.track(model=m)
        for step in range(7):
            with torch.no_grad():
                m.weight.fill_(step)
            mgr.save(step, state, metrics={"loss": float(step)}, epoch=step // 2)
    return tmp_path


@pytest.mark.parametrize("form", ["int", "digits", "folder", "path", "path/", "uri"])
def test_which_forms(five_steps, form):
    which = {
        "int": 5,
        "digits": "5",
        "folder": "step_000000005",
        "path": str(five_steps / "step_000000005"),
        "path/": str(five_steps / "step_000000005") + "/",
        "uri": "file://" + str(five_steps / "step_000000005"),
    }[form]
    m = nn.Linear(2, 2)
    mgr = manager(five_steps)
    info = mgr.restore(mgr.track(model=m), which=which)
    assert info.step == 5 and info.epoch == 2
    assert torch.equal(m.weight, torch.full((2, 2), 5.0))


def test_which_path_of_a_checkpoint_in_another_run(five_steps, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(five_steps / "step_000000003", other / "step_000000003")
    m = nn.Linear(2, 2)
    fresh_root = tmp_path_factory.mktemp("fresh_run")
    mgr = manager(fresh_root)
    info = mgr.restore(mgr.track(model=m), which=str(other / "step_000000003"))
    assert info.step == 3 and torch.equal(m.weight, torch.full((2, 2), 3.0))
    assert info.uri.endswith("step_000000003")
    assert mgr.checkpoints() == []  # loading from elsewhere does not adopt it


@pytest.mark.parametrize("which", ["foo", 3.5, True, None, "", "best", "step_5", ["last"]])
def test_unknown_which_is_config_error(five_steps, which):
    mgr = manager(five_steps, best={"loss": "min"})
    m = nn.Linear(2, 2)
    before = m.weight.clone()
    with pytest.raises(ConfigError, match="which="):
        mgr.restore(mgr.track(model=m), which=which)
    assert torch.equal(m.weight, before)
    with pytest.raises(ConfigError, match="which="):
        mgr.load_weights(m, which=which)


def test_which_negative_step_is_config_error(five_steps):
    mgr = manager(five_steps)
    with pytest.raises(ConfigError, match="-1"):
        mgr.restore(mgr.track(model=nn.Linear(2, 2)), which=-1)


def test_best_of_untracked_metric_and_metric_without_value(five_steps):
    mgr = manager(five_steps, best={"loss": "min", "pck": "max"})
    state = mgr.track(model=nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="'nope' is not tracked"):
        mgr.restore(state, which="best:nope")
    with pytest.raises(CheckpointNotFound, match="pck"):
        mgr.restore(state, which="best:pck")  # tracked, but no checkpoint reported it
    assert mgr.restore(state, which="best:loss").step == 0


def test_step_not_committed_is_not_found(five_steps):
    mgr = manager(five_steps)
    state = mgr.track(model=nn.Linear(2, 2))
    for which in (99, "99", "step_000000099", str(five_steps / "step_000000099")):
        with pytest.raises(CheckpointNotFound):
            mgr.restore(state, which=which)


# -- load_weights ------------------------------------------------------------------------------
def test_load_weights_fresh_model_optimizer_untouched(tmp_path):
    gan = Gan(0)
    with manager(tmp_path, best={"g": "min"}) as mgr:
        state = mgr.track(**gan.objects())
        for step in range(3):
            gan.train_step()
            mgr.save(step, state, metrics={"g": 3.0 - step if step != 1 else 0.0})
            if step == 1:
                best_gen = copy.deepcopy(gan.generator.state_dict())
    last_gen = gan.generator.state_dict()

    fresh = Gan(42)
    opt_before = copy.deepcopy(fresh.opt_g.state_dict())
    disc_before = copy.deepcopy(fresh.discriminator.state_dict())
    mgr = manager(tmp_path, best={"g": "min"})
    with pytest.raises(ConfigError, match="generator"):
        mgr.load_weights(fresh.generator)  # two models: name= is required
    with pytest.raises(ConfigError, match="opt_g"):
        mgr.load_weights(fresh.generator, name="opt_g")  # not a model
    assert mgr.load_weights(fresh.generator, name="generator").step == 2
    assert_same(dict(last_gen), dict(fresh.generator.state_dict()))
    assert int(mgr.load_weights(fresh.generator, which="best:g", name="generator")) == 1
    assert_same(dict(best_gen), dict(fresh.generator.state_dict()))
    assert_same(opt_before, fresh.opt_g.state_dict())  # optimizer untouched
    assert_same(disc_before, fresh.discriminator.state_dict())
    assert fresh.sched_g.last_epoch == 0

    # a run with one model: name may be omitted
    single = tmp_path / "single"
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mgr = manager(single)
    mgr.save(0, mgr.track(net=m, opt=opt))
    m2 = nn.Linear(3, 2)
    assert mgr.load_weights(m2).step == 0
    assert_same(dict(m.state_dict()), dict(m2.state_dict()))
