"""Fixtures of the CLI tests: real runs written by CheckpointManager (single process, and one
2-rank FSDP2 job). Helpers are in cli_support.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_support import Run, train_and_save
from torch import nn


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Read-only shared run (copy it before changing it): steps 2, 5, 7, 8 committed."""
    run = train_and_save(tmp_path_factory.mktemp("cli") / "run")
    assert run.steps == [2, 5, 7, 8]
    return run


@pytest.fixture
def run_copy(run_dir: Run, tmp_path: Path) -> Run:
    root = tmp_path / "run"
    shutil.copytree(run_dir.root, root)
    return Run(root, list(run_dir.steps), run_dir.models)


@pytest.fixture(scope="session")
def zstd_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A compressed run whose weights are big enough to be stored zstd-compressed."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    return train_and_save(tmp_path_factory.mktemp("cli") / "zrun", steps=[1, 2], compression="zstd", model=model)


@pytest.fixture(scope="session")
def fsdp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint folder, reference safetensors of the full model) of a 2-rank FSDP2 job."""
    import _cli_workers
    from support.dist import run_ranks

    root = tmp_path_factory.mktemp("cli") / "fsdp"
    ref = root.parent / "fsdp_full.safetensors"
    step = run_ranks(_cli_workers.save_fsdp, 2, str(root), str(ref), timeout=120)[0]
    return root / f"step_{step:09d}", ref
