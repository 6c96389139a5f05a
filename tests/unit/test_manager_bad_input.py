"""CheckpointManager in one process: bad input is refused with an error naming it, and nothing
already saved is lost."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from manager_common import FAST, Gan, assert_same, manager, my_warnings, read_manifest, step_dirs, steps_on_disk  # noqa: F401
from torch import nn

from dist_ckpt import CheckpointManager, rng
from dist_ckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigChanged,
    ConfigError,
    StepAlreadyExists,
    UnsupportedValue,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


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
