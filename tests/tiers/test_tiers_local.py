"""Tiered checkpoints without S3 (fast, in the default run): the policy, one uploader per local
root (real processes racing), a manager with a local-directory root (persist_every_n_saves,
retention per tier, checkpoints() and `dist-ckpt list --local-root`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tier_support import reap_uploaders, uploader_pid, wait_for

import dist_ckpt
from dist_ckpt import CheckpointManager, ConfigError
from dist_ckpt import manifest as mf
from dist_ckpt.run_store import RunStore
from dist_ckpt.tiers.policy import local_drops, promotion_due, tiered_listing
from dist_ckpt.tiers.queue import PromotionQueue, PromotionRequest
from storage_backends import open_backend


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DIST_CKPT_UPLOADER_IDLE_S", "2")
    yield tmp_path
    reap_uploaders(tmp_path)


def test_policy() -> None:
    assert [promotion_due(i, 3, force=False, moved_best=False) for i in range(1, 7)] == [False, False, True] * 2
    assert promotion_due(1, 3, force=True, moved_best=False) and promotion_due(2, 3, force=False, moved_best=True)
    assert local_drops([1, 2, 3, 4, 5], 2, unsettled={2}) == [1, 3]  # 2 waits for its promotion
    entries, tiers = tiered_listing([mf.Entry(1), mf.Entry(2)], [mf.Entry(2), mf.Entry(3)])
    assert [e.step for e in entries] == [1, 2, 3] and tiers == {1: ("root",), 2: ("local", "root"), 3: ("local",)}


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="persist_every_n_saves=0"):
        CheckpointManager(str(tmp_path / "r"), local_root=str(tmp_path / "l"), persist_every_n_saves=0)
    with pytest.raises(ConfigError, match="local_root='s3://b/x'"):
        CheckpointManager(str(tmp_path / "r"), local_root="s3://b/x")


def test_never_two_uploaders_and_no_double_upload(work: Path) -> None:
    local, root = work / "local", work / "root"
    dist_ckpt.save({"w": torch.arange(1 << 16, dtype=torch.float32)}, f"{local}/step_000000001")
    PromotionQueue(local).enqueue(PromotionRequest(step=1, root=str(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dist_ckpt.tiers.uploader", str(local), "--idle-exit", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    text = "\n".join(logs)
    assert text.count("serving ") == 1 and text.count("another uploader serves") == 3, text
    assert text.count("step 1: sent ") == 1 and text.count("step 1 committed") == 1, text
    assert [e.step for e in RunStore(open_backend(str(root))).committed_entries()] == [1]
    assert PromotionQueue(local).pending_steps() == set()


def test_an_uploader_whose_local_tier_was_wiped_leaves_the_new_tier_to_its_new_uploader(work: Path) -> None:
    """A wiped and re-created local tier (a node disk replaced under a live uploader) gets its
    own uploader; the old one must stop, not serve the new queue beside it (it once did, and
    the two settled each other's steps: one promoted, the other then recorded it as failed)."""
    local = work / "local"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    old = subprocess.Popen(
        [sys.executable, "-m", "dist_ckpt.tiers.uploader", str(local), "--idle-exit", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    wait_for(lambda: uploader_pid(local), 60, "the first uploader serves")
    shutil.rmtree(local)
    local.mkdir()
    new = subprocess.Popen(
        [sys.executable, "-m", "dist_ckpt.tiers.uploader", str(local), "--idle-exit", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    old_log = old.communicate(timeout=30)[0]  # long before its 60 s idle exit
    assert old.returncode == 0 and "was deleted and re-created" in old_log, old_log
    new_log = new.communicate(timeout=60)[0]
    assert new.returncode == 0 and "serving " in new_log, new_log


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_with_a_local_tier(work: Path, async_save: bool) -> None:
    root, local = work / "root", work / "local"
    model = torch.nn.Linear(32, 32)
    mgr = CheckpointManager(
        str(root),
        local_root=str(local),
        keep_last=2,
        local_keep_last=2,
        persist_every_n_saves=2,
        best={"loss": "max"},
        async_save=async_save,
    )
    state = mgr.track(model=model)
    for step, loss in enumerate([1.0, 0.5, 0.4, 0.3, 0.2]):  # "max": only step 0 is a best
        with torch.no_grad():
            model.weight.add_(1.0)
        mgr.save(step, state, metrics={"loss": loss}, force=step == 4)
        mgr.wait()
    mgr.wait(persisted=True)
    # promoted: 0 (best), 1 and 3 (every 2nd save), 4 (force); root keeps the newest 2 plus the best
    assert [e.step for e in RunStore(open_backend(str(root))).committed_entries()] == [0, 3, 4]
    tiers = {c.step: c.tiers for c in mgr.checkpoints()}
    assert tiers == {0: ("root",), 3: ("local", "root"), 4: ("local", "root")}, tiers
    mgr.close()
    out = subprocess.run(
        [sys.executable, "-m", "dist_ckpt.cli", "list", str(root), "--local-root", str(local), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = {c["step"]: c["tiers"] for c in json.loads(out.stdout)["checkpoints"]}
    assert listed == {0: ["root"], 3: ["local", "root"], 4: ["local", "root"]}
    # step 2 was never due: retention removed it from the local tier without a promotion
    assert not (local / "step_000000002").exists()
    # a fresh manager restores the newest step from the local tier, bit for bit
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    mgr = CheckpointManager(str(root), local_root=str(local))
    info = mgr.restore(mgr.track(model=model))
    mgr.close()
    assert info is not None and info.step == 4 and info.uri == f"{local}/step_000000004"
    assert torch.equal(model.weight, saved)
    wait_for(lambda: uploader_pid(local) is None, 30, "the uploader exits when idle")


def test_a_damaged_local_checkpoint_is_not_promoted_and_says_why(work: Path) -> None:
    local, root = work / "local", work / "root"
    dist_ckpt.save({"w": torch.arange(1 << 16, dtype=torch.float32)}, f"{local}/step_000000001")
    shard = local / "step_000000001" / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x40
    shard.write_bytes(bytes(data))
    queue = PromotionQueue(local)
    queue.enqueue(PromotionRequest(step=1, root=str(root), local_keep_last=1))
    proc = subprocess.run(
        [sys.executable, "-m", "dist_ckpt.tiers.uploader", str(local), "--idle-exit", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reason = queue.failure(1)
    assert reason is not None and "checksum mismatch" in reason and str(shard) in reason, reason
    assert queue.pending_steps() == set()
    assert RunStore(open_backend(str(root))).committed_entries() == []  # nothing of it at the root
    assert shard.exists()  # kept locally: its promotion never committed
