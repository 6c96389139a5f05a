"""Incremental checkpoints of an FSDP2 job: 2 ranks, the frozen half of the model written once
(by both ranks: per-rank shards), async saves, resumed at 1 rank bit-identical; on a local
root and on the real SeaweedFS S3 server, codec none and zstd."""

from __future__ import annotations

from pathlib import Path

import _incremental_workers as workers
import pytest
from support.dist import run_ranks


def _check(root: str, refs: Path) -> None:
    results = run_ranks(workers.save_job, 2, root, str(refs), "none", timeout=240)
    info = results[0]
    assert [s for s, _, _ in info["checkpoints"]] == [3, 4]
    for step, own, logical in info["checkpoints"]:
        assert logical > 2 * own, (step, own, logical)  # the frozen half is read, not stored again
        refs_of_step = [f for f in info["files"][step] if "/" in f]
        # both ranks' shards of the first save hold the frozen half
        assert sorted(f.split("/", 1)[1].split("-")[0].split(".")[0] for f in refs_of_step) == [
            "rank_00000",
            "rank_00001",
        ], refs_of_step
        assert {f.split("/", 1)[0] for f in refs_of_step} == {"step_000000001"}
    for step in (4, 3):  # the newest and the kept older step, at another world size
        assert run_ranks(workers.load_job, 1, root, str(refs), step, timeout=240) == [True]


@pytest.mark.slow
def test_fsdp2_frozen_half_2_ranks_resumed_at_1(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    _check(str(tmp_path / "run"), refs)


@pytest.mark.slow
def test_fsdp2_frozen_half_on_seaweedfs(s3_uri, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    _check(s3_uri, refs)


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_ddp_2_ranks_async_incremental(tmp_path, compression):
    results = run_ranks(workers.ddp_job, 2, str(tmp_path / "run"), compression, timeout=240)
    for step, own, logical in results[0]["checkpoints"]:
        assert logical > 2 * own, (step, own, logical)  # the frozen layer is read, not written again
