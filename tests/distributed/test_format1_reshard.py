"""Issue 20: a format-1 checkpoint (the committed fixture, written by one rank with the code
before format 2) restores resharded: 2 and 3 ranks load it into DTensors, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import _format1_workers as workers
import pytest
import torch
from support.dist import run_ranks

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "format1_checkpoint" / "step_000000003"


@pytest.mark.parametrize("world_size", [2, 3])
def test_format1_fixture_restores_resharded(world_size: int, tmp_path: Path) -> None:
    ckpt = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, ckpt)
    torch.manual_seed(0)  # what tests/fixtures/make_format1_fixture.py saved
    expected = {"w": torch.randn(7, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(3, 4).bfloat16()}
    for rank, got in enumerate(run_ranks(workers.load_sharded, world_size, str(ckpt), timeout=200)):
        assert got["step"] == 3 and got["note"] == "written by dist_ckpt format 1", rank
        for k, v in expected.items():
            assert got["model"][k].dtype == v.dtype and torch.equal(
                got["model"][k].view(torch.uint8), v.view(torch.uint8)
            ), (rank, k)
