"""CheckpointManager in one process: config changes, counters, GradScaler, manifest repair and
crash leftovers. Bad input: test_manager_bad_input.py."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from manager_common import FAST, Gan, assert_same, manager, my_warnings, read_manifest, step_dirs, steps_on_disk  # noqa: F401
from torch import nn

from dist_ckpt.errors import (
    CheckpointNotFound,
    ConfigChanged,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


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
    assert info.config_changes == (
        "batch: 32 -> (removed)",
        "lr: 0.01 -> 0.02",
        "optim.lr: 0.0002 -> 0.0001",
        "seed: (absent) -> 1",
    )
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
