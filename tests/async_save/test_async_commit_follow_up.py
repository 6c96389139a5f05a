"""The async worker's follow-up of a commit (rank 0's manifest update, then retention) is a
``CommitFollowUp`` built from values when the save is submitted: the worker runs no manager
code and returns the outcome, which the foreground consumes at the next save(), wait() or
close(). A ``save()`` of a step that is not due returns while the manifest update of the
previous save is still running, and ``wait()`` returns only once the manifest lists that save.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from async_helpers import committed_steps
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import ConfigError
from dist_ckpt.run_store import RunStore
from storage_backends.local import LocalBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_save_is_not_held_by_the_background_manifest_update(tmp_path: Path) -> None:
    in_update, release = threading.Event(), threading.Event()

    def hold(op: str, key: str) -> None:  # the worker's manifest CAS waits here until released
        in_update.set()
        assert release.wait(30)

    backend = FaultyBackend(LocalBackend(str(tmp_path)))
    mgr = CheckpointManager(str(tmp_path), backend=backend, async_save=True, save_every_n_steps=10, keep_last=1)
    state = mgr.track(model=torch.nn.Linear(4, 2), counters={"n": 0})
    assert mgr.save(10, state)
    mgr.wait()
    backend.add(Rule("compare_and_swap", "manifest.json", "call", hook=hold))
    assert mgr.save(20, state)
    assert in_update.wait(30), "the worker reached the manifest update"
    t0 = time.monotonic()
    try:
        assert not mgr.save(21, state)  # not due: only the decision, which reads _last_step
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 5, f"save() waited {took:.1f}s for the background manifest update"
    mgr.wait()
    manifest, _ = RunStore(LocalBackend(str(tmp_path))).read_manifest()
    assert manifest is not None and [e.step for e in manifest.entries] == [20], "wait(): listed, retention done"
    assert committed_steps(tmp_path) == [20]
    mgr.close()


def test_a_step_behind_the_save_in_flight_is_refused_before_its_follow_up_finishes(tmp_path: Path) -> None:
    """The "steps only go forward" check counts the save in flight: saving step 15 while step
    20's manifest update is still running is refused (before, it depended on whether the
    worker had got that far), and nothing of step 15 is written."""
    in_update, release = threading.Event(), threading.Event()

    def hold(op: str, key: str) -> None:
        in_update.set()
        assert release.wait(30)

    backend = FaultyBackend(LocalBackend(str(tmp_path)))
    mgr = CheckpointManager(str(tmp_path), backend=backend, async_save=True)
    state = mgr.track(model=torch.nn.Linear(4, 2))
    backend.add(Rule("compare_and_swap", "manifest.json", "call", hook=hold))
    try:
        assert mgr.save(20, state)
        assert in_update.wait(30), "the worker reached the manifest update"
        with pytest.raises(ConfigError, match=r"step 15 is behind the run's last checkpoint \(step 20\)"):
            mgr.save(15, state)
    finally:
        release.set()
    mgr.wait()
    assert committed_steps(tmp_path) == [20]
    assert mgr.save(21, state)
    mgr.close()
    manifest, _ = RunStore(LocalBackend(str(tmp_path))).read_manifest()
    assert manifest is not None and manifest.pointers["last"] == 21
