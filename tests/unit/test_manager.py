"""CheckpointManager in one process on a local directory: the users' scenarios, resume
semantics, retention, manifest repair, crash leftovers and bad input."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_ckpt import CheckpointManager
from dist_ckpt import manifest as mf
from dist_ckpt import rng
from dist_ckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigChanged,
    ConfigError,
    StepAlreadyExists,
    UnsupportedValue,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

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
        return dict(generator=self.generator, discriminator=self.discriminator, opt_g=self.opt_g,
                    opt_d=self.opt_d, sched_g=self.sched_g, sched_d=self.sched_d)  # fmt: skip

    def train_step(self) -> float:
        real = torch.randn(16, 4) + 2.0
        fake = self.generator(torch.randn(16, 4))
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), torch.ones(16, 1)) + bce(self.discriminator(fake.detach()), torch.zeros(16, 1))
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
    assert manager(tmp_path, best={"loss": "min"}).restore(state, which=1).epochs_without_improvement == {"loss": 0, "pck": 1}


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
        files = [p for p in (tmp_path / f"step_{c.step:09d}").iterdir() if p.name.startswith("rank_")]
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
    assert mgr.load_weights(fresh.generator, name="generator") == 2
    assert_same(dict(last_gen), dict(fresh.generator.state_dict()))
    assert mgr.load_weights(fresh.generator, which="best:g", name="generator") == 1
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
    assert mgr.load_weights(m2) == 0
    assert_same(dict(m.state_dict()), dict(m2.state_dict()))


# -- config, tracker id, total steps ------------------------------------------------------------
def test_config_change_is_warned_key_by_key(tmp_path):
    m = nn.Linear(2, 2)
    cfg = {"lr": 0.01, "optim": {"lr": 0.0002, "betas": [0.5, 0.9]}, "batch": 32}
    mgr = manager(tmp_path, config=cfg)
    mgr.save(0, mgr.track(model=m))

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        info = manager(tmp_path, config=cfg).restore(mgr.track(model=m))
    assert info.config_changes == () and not my_warnings(rec, "config changed")

    new = {"lr": 0.02, "optim": {"lr": 0.0001, "betas": [0.5, 0.9]}, "seed": 1}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        info = manager(tmp_path, config=new).restore(mgr.track(model=m))
    assert info.config_changes == ("batch: 32 -> (removed)", "lr: 0.01 -> 0.02",
                                   "optim.lr: 0.0002 -> 0.0001", "seed: (absent) -> 1")  # fmt: skip
    (msg,) = my_warnings(rec, "config changed")
    assert "lr: 0.01 -> 0.02" in msg and "optim.lr: 0.0002 -> 0.0001" in msg


def test_strict_config_refuses_unless_key_may_change(tmp_path):
    m = nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mgr = manager(tmp_path, config={"lr": 0.01, "epochs": 10})
    mgr.save(0, mgr.track(model=m, opt=opt))
    saved = m.weight.clone()

    fresh = nn.Linear(2, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    before = fresh.weight.clone()
    torch.manual_seed(3)
    rng_before = torch.get_rng_state()
    strict = manager(tmp_path, config={"lr": 0.02, "epochs": 10}, strict_config=True)
    with pytest.raises(ConfigChanged, match=r"lr: 0\.01 -> 0\.02"):
        strict.restore(strict.track(model=fresh, opt=fresh_opt))
    assert torch.equal(fresh.weight, before)  # refused before anything was modified
    assert torch.equal(torch.get_rng_state(), rng_before)

    allowed = manager(tmp_path, config={"lr": 0.02, "epochs": 10}, strict_config=True, config_may_change=["lr"])
    with pytest.warns(UserWarning, match=r"lr: 0\.01 -> 0\.02"):
        info = allowed.restore(allowed.track(model=fresh, opt=fresh_opt))
    assert info.config_changes == ("lr: 0.01 -> 0.02",)
    assert torch.equal(fresh.weight, saved)

    partly = manager(tmp_path, config={"lr": 0.02, "epochs": 20}, strict_config=True, config_may_change=("lr",))
    with pytest.raises(ConfigChanged, match="epochs: 10 -> 20") as exc:
        partly.restore(partly.track(model=fresh, opt=fresh_opt))
    assert "lr:" not in str(exc.value).split("strict_config=True):")[1].split(".")[0]


def test_tracker_run_id_comes_back(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path, tracker_run_id="wandb-3x7k")
    mgr.save(0, mgr.track(model=m))
    assert read_manifest(tmp_path).tracker_run_id == "wandb-3x7k"
    resumed = manager(tmp_path)  # the resumed job does not know the id yet
    assert resumed.tracker_run_id is None
    info = resumed.restore(resumed.track(model=m))
    assert info.tracker_run_id == "wandb-3x7k" and resumed.tracker_run_id == "wandb-3x7k"
    resumed.save(1, resumed.track(model=m))
    assert manager(tmp_path).restore(resumed.track(model=m)).tracker_run_id == "wandb-3x7k"


def test_resume_when_target_reached_warns(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path)
    state = mgr.track(model=m)
    mgr.save(3, state, epoch=1)
    mgr.save(4, state, epoch=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        manager(tmp_path, total_steps=5).restore(state, which=3)
        manager(tmp_path, total_epochs=3).restore(state, which=3)
    assert not my_warnings(rec, "already reached")
    with pytest.warns(UserWarning, match="resumed at step 4.*already reached"):
        manager(tmp_path, total_steps=5).restore(state)
    with pytest.warns(UserWarning, match="already reached"):
        manager(tmp_path, total_epochs=3).restore(state)


# -- counters, GradScaler ------------------------------------------------------------------------
def test_dict_counters_restored_in_place(tmp_path):
    m = nn.Linear(2, 2)
    counters = {"tokens": 5, "samples": 2**60, "seen": [1, 2], "name": "x"}
    mgr = manager(tmp_path)
    mgr.save(0, mgr.track(model=m, counters=counters))
    counters["tokens"] = 500
    mgr.save(1, mgr.track(model=m, counters=counters))

    mine = {"tokens": 0, "stale": True}
    same = mine
    info = manager(tmp_path).restore(mgr.track(model=m, counters=mine), which=0)
    assert info.step == 0
    assert same is mine and mine == {"tokens": 5, "samples": 2**60, "seen": [1, 2], "name": "x"}
    manager(tmp_path).restore(mgr.track(model=m, counters=mine))
    assert mine["tokens"] == 500


def test_counters_track_literal(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path)
    state = mgr.track(model=m, counters={"tokens": 5})
    mgr.save(0, state)
    state.objects["counters"]["tokens"] = 99
    manager(tmp_path).restore(state)
    assert state.objects["counters"] == {"tokens": 5}


@pytest.mark.parametrize("enabled", [False, True])
def test_grad_scaler_saved_and_restored(tmp_path, enabled):
    m = nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=2.0**10, growth_interval=7)
    if enabled:
        for new_scale in (123.0, None):
            opt.zero_grad()
            scaler.scale(m(torch.randn(4, 2)).sum()).backward()
            scaler.step(opt)
            scaler.update(new_scale=new_scale)
    saved = scaler.state_dict()
    mgr = manager(tmp_path)
    mgr.save(0, mgr.track(model=m, opt=opt, scaler=scaler))

    fresh = torch.amp.GradScaler("cpu", enabled=enabled)
    manager(tmp_path).restore(mgr.track(model=m, opt=opt, scaler=fresh))
    assert fresh.state_dict() == saved
    if enabled:
        assert saved["scale"] == 123.0 and saved["growth_interval"] == 7 and saved["_growth_tracker"] == 1
        assert fresh.get_scale() == 123.0
    else:
        assert saved == {}


# -- manifest repair and crash leftovers -----------------------------------------------------------
def _run_with_steps(root, steps, losses=None):
    m = nn.Linear(2, 2)
    mgr = manager(root, best={"loss": "min"})
    state = mgr.track(model=m)
    for i, step in enumerate(steps):
        mgr.save(step, state, metrics={"loss": (losses or {}).get(step, 10.0 - i)})
    return mgr, state


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "empty", "dangling"])
def test_damaged_manifest_is_rebuilt(tmp_path, damage):
    _run_with_steps(tmp_path, [0, 1, 2, 3], {0: 2.0, 1: 0.5, 2: 1.0, 3: 3.0})
    good = read_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    data = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(200))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        doc = json.loads(data)
        doc["checkpoints"] = doc["checkpoints"][2:]  # best:loss (step 1) now dangles
        path.write_text(json.dumps(doc))
    mgr = manager(tmp_path, best={"loss": "min"})
    rebuilt = read_manifest(tmp_path)  # valid again, on storage
    assert rebuilt.steps() == [0, 1, 2, 3]
    assert rebuilt.pointers == good.pointers == {"last": 3, "best:loss": 1}
    assert [(c.step, c.metrics) for c in mgr.checkpoints()] == [(e.step, dict(e.metrics)) for e in good.entries]
    assert mgr.restore(mgr.track(model=nn.Linear(2, 2)), which="best:loss").step == 1


def test_damaged_manifest_is_rebuilt_even_when_read_without_restart(tmp_path):
    mgr, state = _run_with_steps(tmp_path, [0, 1], {0: 1.0, 1: 2.0})
    (tmp_path / "manifest.json").write_bytes(b"{trunc")
    assert [c.step for c in mgr.checkpoints()] == [0, 1]
    assert mgr.restore(state, which="best:loss").step == 0
    mgr.save(2, state, metrics={"loss": 0.1})  # the save after it rewrites a whole manifest
    assert read_manifest(tmp_path).pointers == {"last": 2, "best:loss": 2}
    assert read_manifest(tmp_path).steps() == [0, 1, 2]


def test_stale_manifest_lacking_newest_step_is_rebuilt(tmp_path):
    mgr, state = _run_with_steps(tmp_path, [0, 1, 2], {0: 2.0, 1: 1.0, 2: 3.0})
    old = (tmp_path / "manifest.json").read_bytes()
    mgr.save(3, state, metrics={"loss": 0.5})  # the new best
    (tmp_path / "manifest.json").write_bytes(old)  # as if the job died between COMMITTED and the update
    assert read_manifest(tmp_path).pointers == {"last": 2, "best:loss": 1}

    mgr = manager(tmp_path, best={"loss": "min"})
    assert read_manifest(tmp_path).steps() == [0, 1, 2, 3]
    assert read_manifest(tmp_path).pointers == {"last": 3, "best:loss": 3}
    info = mgr.restore(state)
    assert info.step == 3
    assert mgr.restore(state, which="best:loss").step == 3


def test_stale_manifest_listing_a_removed_step_is_rebuilt(tmp_path):
    _run_with_steps(tmp_path, [0, 1, 2], {0: 2.0, 1: 1.0, 2: 3.0})
    shutil.rmtree(tmp_path / "step_000000001")  # someone deleted the best by hand
    mgr = manager(tmp_path, best={"loss": "min"})
    assert read_manifest(tmp_path).steps() == [0, 2]
    assert read_manifest(tmp_path).pointers == {"last": 2, "best:loss": 0}
    assert mgr.restore(mgr.track(model=nn.Linear(2, 2)), which="best:loss").step == 0


def test_crashed_save_leftovers_removed_at_start_and_never_restored(tmp_path):
    _run_with_steps(tmp_path, [0, 5])
    tmp_dir = tmp_path / "step_000000007.tmp-abc123"
    tmp_dir.mkdir()
    (tmp_dir / "rank_00000.safetensors").write_bytes(b"half a shard")
    (tmp_dir / "metadata.json").write_text("{}")
    uncommitted = tmp_path / "step_000000008"
    uncommitted.mkdir()
    (uncommitted / "rank_00000.safetensors").write_bytes(b"whole shard, never committed")
    (uncommitted / "metadata.json").write_text("{}")

    # before any gc, readers ignore them
    keep = manager(tmp_path, collect_garbage_on_start=False)
    state = keep.track(model=nn.Linear(2, 2))
    assert [c.step for c in keep.checkpoints()] == [0, 5]
    assert keep.restore(state).step == 5
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint for step 8"):
        keep.restore(state, which=8)
    with pytest.raises(CheckpointNotFound, match="not committed"):
        keep.restore(state, which="step_000000008")
    with pytest.raises(CheckpointNotFound):
        keep.restore(state, which=str(tmp_dir))
    with pytest.raises(CheckpointNotFound):
        keep.restore(state, which=7)
    assert tmp_dir.exists() and uncommitted.exists()

    mgr = manager(tmp_path)
    assert not tmp_dir.exists() and not uncommitted.exists()
    assert step_dirs(tmp_path) == ["step_000000000", "step_000000005"]
    assert read_manifest(tmp_path).steps() == [0, 5]
    assert mgr.restore(state).step == 5
    with pytest.raises(CheckpointNotFound):
        mgr.restore(state, which=8)
    mgr.save(8, state)  # the step can now be saved for real
    assert steps_on_disk(tmp_path) == [0, 5, 8]


# -- bad input -----------------------------------------------------------------------------------
class _NoState:
    pass


def test_object_without_state_dict_is_refused_and_nothing_written(tmp_path):
    mgr = manager(tmp_path)
    with pytest.raises(ConfigError, match="loader"):
        mgr.track(model=nn.Linear(2, 2), loader=_NoState())
    assert step_dirs(tmp_path) == []
    assert read_manifest(tmp_path).steps() == []


def test_optimizer_whose_model_is_not_tracked(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path)
    with pytest.raises(ConfigError, match="optimizer"):
        mgr.track(opt=torch.optim.AdamW(m.parameters()))
    assert step_dirs(tmp_path) == []


@pytest.mark.parametrize(
    "options, named",
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": -1}, "keep_last"),
        ({"keep_last": 2.5}, "keep_last"),
        ({"save_every_n_steps": True}, "save_every_n_steps"),
        ({"best": {"x": "up"}}, "best"),
        ({"best": {"a:b": "min"}}, "best"),
        ({"best": ["loss"]}, "best"),
        ({"compression": "lz4"}, "compression"),
        ({"async_mode": "fork"}, "async_mode"),
        ({"config": {"f": object()}}, "config"),
        ({"tracker_run_id": 5}, "tracker_run_id"),
        ({"kep_last": 3}, "kep_last"),
        ({"config_may_change": "lr"}, "config_may_change"),  # would allow "l" and "r"
        ({"config_may_change": ("lr", 3)}, "config_may_change"),
        ({"strict_config": "yes"}, "strict_config"),
        ({"backend_options": {"fsynk": False}}, "backend_options.*fsynk"),
        ({"backend_options": [("fsync", False)]}, "backend_options"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(tmp_path, options, named):
    root = tmp_path / "run"
    with pytest.raises(ConfigError, match=named):
        CheckpointManager(str(root), **options)
    assert not root.exists()


def test_bad_step_and_metrics(tmp_path):
    mgr = manager(tmp_path, best={"loss": "min"})
    state = mgr.track(model=nn.Linear(2, 2))
    for step in (-1, 1.0, "3", True):
        with pytest.raises(ConfigError):
            mgr.save(step, state)
    with pytest.raises(ConfigError, match="loss"):
        mgr.save(0, state, metrics={"loss": "low"})
    with pytest.raises(ConfigError, match="track"):
        mgr.save(0, {"model": nn.Linear(2, 2)})
    assert step_dirs(tmp_path) == []
    assert mgr.best == {}  # a refused save records nothing


class _Sampler:
    def __init__(self, extra=None):
        self.epoch, self.extra = 3, extra

    def state_dict(self):
        return {"epoch": self.epoch, "extra": {"perm": [3, 1, 2], "bad": self.extra}}

    def load_state_dict(self, sd):
        self.epoch = sd["epoch"]


def test_non_json_value_is_refused_naming_the_key_and_nothing_committed(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path, best={"loss": "min"})
    mgr.save(0, mgr.track(model=m, sampler=_Sampler()), metrics={"loss": 1.0})
    bad = mgr.track(model=m, sampler=_Sampler(extra=object()))
    with pytest.raises(UnsupportedValue, match=r"sampler\.extra\.bad.*builtins\.object"):
        mgr.save(1, bad, metrics={"loss": 0.1})
    assert step_dirs(tmp_path) == ["step_000000000"]  # no step_1, no temp dir
    assert read_manifest(tmp_path).pointers == {"last": 0, "best:loss": 0}
    assert mgr.best == {"loss": 1.0}
    with pytest.raises(UnsupportedValue, match=r"counters\.fn"):
        mgr.save(1, mgr.track(model=m, counters={"fn": len}))
    assert step_dirs(tmp_path) == ["step_000000000"]
    assert mgr.restore(mgr.track(model=m, sampler=_Sampler())).step == 0
    assert mgr.save(1, mgr.track(model=m, sampler=_Sampler()))  # the run goes on


def test_saving_the_same_step_twice(tmp_path):
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path, best={"loss": "min"})
    state = mgr.track(model=m)
    mgr.save(3, state, metrics={"loss": 1.0})
    weight = m.weight.clone()
    with torch.no_grad():
        m.weight.add_(1)
    with pytest.raises(StepAlreadyExists, match="step 3 is already committed"):
        mgr.save(3, state, metrics={"loss": 0.5})
    with pytest.raises(StepAlreadyExists):
        manager(tmp_path).save(3, state)  # from another job too
    assert step_dirs(tmp_path) == ["step_000000003"]
    assert read_manifest(tmp_path).entry(3).metrics == {"loss": 1.0}
    manager(tmp_path).restore(state)
    assert torch.equal(m.weight, weight)  # the committed step was not overwritten


def test_saving_behind_the_last_step_is_refused(tmp_path):
    """Resuming from an older checkpoint (best:loss) and saving a step behind the run's last
    would write a checkpoint that retention deletes at once (the newest *step* is kept), while
    "last" keeps naming the later step: refused with a clear error instead."""
    m = nn.Linear(2, 2)
    with manager(tmp_path, keep_last=1, best={"loss": "min"}) as mgr:
        state = mgr.track(model=m)
        for step, loss in enumerate([3.0, 1.0, 2.0, 2.5, 2.7]):
            mgr.save(step, state, metrics={"loss": loss})
    assert steps_on_disk(tmp_path) == [1, 4]
    mgr = manager(tmp_path, keep_last=1, best={"loss": "min"})
    assert mgr.restore(state, which="best:loss").step == 1
    with pytest.raises(ConfigError, match=r"step 2 is behind the run's last checkpoint \(step 4\)"):
        mgr.save(2, state, metrics={"loss": 0.1})
    assert steps_on_disk(tmp_path) == [1, 4]
    assert read_manifest(tmp_path).pointers == {"last": 4, "best:loss": 1}
    assert mgr.save(5, state, metrics={"loss": 0.1})  # forward is fine
    assert steps_on_disk(tmp_path) == [5]


def test_closed_manager_refuses_and_context_manager_closes(tmp_path):
    with manager(tmp_path) as mgr:
        state = mgr.track(model=nn.Linear(2, 2))
    for call in (lambda: mgr.save(0, state), lambda: mgr.restore(state), mgr.wait):
        with pytest.raises(ConfigError, match="closed"):
            call()


def test_rank_without_saved_rng_is_reseeded_from_step_and_rank(tmp_path, monkeypatch):
    """A checkpoint whose RNG states belong to other ranks (as after a world-size change):
    this rank is reseeded deterministically from (step, rank)."""
    m = nn.Linear(2, 2)
    mgr = manager(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(rng, "rank_key", lambda rank: f"rank_{rank + 1}")  # as if rank 1 had saved it
        mgr.save(9, mgr.track(model=m))
    assert (tmp_path / "step_000000009").exists()

    torch.manual_seed(0)
    manager(tmp_path).restore(mgr.track(model=m))
    after_restore = (torch.rand(3), random.random(), np.random.rand())
    rng.reseed(9, 0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after_restore[0], expected[0]) and after_restore[1:] == expected[1:]


def test_errors_are_checkpoint_errors():
    for cls in (CheckpointNotFound, ConfigChanged, ConfigError, StepAlreadyExists, UnsupportedValue):
        assert issubclass(cls, CheckpointError)
