"""A read-only manager lists and restores without changing the run: no lock, no manifest
write, no garbage collection, and save() refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_ckpt import CheckpointManager, ConfigError


def _run(root: Path) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with CheckpointManager(str(root), best={"loss": "min"}) as mgr:
        state = mgr.track(model=model)
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            mgr.save(step, state, metrics={"loss": loss})
    return model


def test_read_only_manager_changes_nothing(tmp_path: Path) -> None:
    model = _run(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").unlink()
    (tmp_path / "run" / "step_000000009.tmp-abc").mkdir()  # a crashed save's leftover
    reader = CheckpointManager(str(tmp_path / "run"), read_only=True, best={"loss": "min"})
    listing = reader.checkpoints()
    assert [(c.step, c.pointers) for c in listing] == [(0, ()), (1, ("best:loss",)), (2, ("last",))]
    fresh = torch.nn.Linear(3, 2)
    info = reader.restore(reader.track(model=fresh))
    assert info is not None and info.step == 2 and torch.equal(fresh.weight, model.weight)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run" / "LOCK").exists()
    assert (tmp_path / "run" / "step_000000009.tmp-abc").exists()
    with pytest.raises(ConfigError, match="read_only"):
        reader.save(3, reader.track(model=fresh))
