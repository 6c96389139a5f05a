"""DDP writes spread over ranks (dist_ckpt/spread_writes.py): parameters and optimizer state
are written by both ranks in balanced parts, buffers by rank 0 only; the checkpoint resumes
bit-identically at 2 ranks and loads the same state at 1 and 3 ranks."""

from __future__ import annotations

from pathlib import Path

import _spread_workers as workers
import pytest
import torch
from safetensors import safe_open
from support.dist import run_ranks


def shard_keys(ckpt: Path) -> dict[str, set[str]]:
    out = {}
    for f in sorted(ckpt.glob("rank_*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out[f.name] = set(st.keys())
    return out


def same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert found.keys() == expected.keys(), what
    for k in expected:
        assert torch.equal(found[k], expected[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("spread") / "run"
    return root, run_ranks(workers.save_and_continue, 2, str(root), True, timeout=180)


def test_parameters_and_optimizer_state_are_written_by_both_ranks_buffers_by_rank_0(saved) -> None:
    root, ranks = saved
    ckpt = root / "step_000000003"
    keys = shard_keys(ckpt)
    assert sorted(keys) == ["rank_00000.safetensors", "rank_00001.safetensors"]
    sizes = {name: (ckpt / name).stat().st_size for name in keys}
    tensor_bytes = sum(v.numel() * v.element_size() for v in ranks[0]["at_save"].values())
    assert min(sizes.values()) > 0.3 * tensor_bytes, f"not balanced: {sizes} for {tensor_bytes} bytes of tensors"
    # buffers differ between the ranks here (each BatchNorm saw its own batch) — and rank 0's are stored
    b0, b1 = ranks[0]["buffers_by_rank"][0], ranks[0]["buffers_by_rank"][1]
    assert any(not torch.equal(b0[k], b1[k]) for k in b0), "the test needs buffers that differ between ranks"
    buffer_entries = {
        k
        for k in keys["rank_00001.safetensors"] | keys["rank_00000.safetensors"]
        if "running" in k or "num_batches" in k
    }
    assert buffer_entries and buffer_entries <= keys["rank_00000.safetensors"], buffer_entries
    assert not any("running" in k or "num_batches" in k for k in keys["rank_00001.safetensors"])
    assert any(".exp_avg" in k for k in keys["rank_00001.safetensors"]), keys["rank_00001.safetensors"]
    assert any(k.startswith("model.") for k in keys["rank_00001.safetensors"]), keys["rank_00001.safetensors"]


def test_resume_at_2_ranks_is_bit_identical(saved) -> None:
    root, ranks = saved
    resumed = run_ranks(workers.resume_and_continue, 2, str(root), timeout=180)
    for r in range(2):
        same(resumed[r]["loaded"], ranks[0]["at_save"], f"rank {r} after restore")  # rank 0's state, buffers too
        same(resumed[r]["final"], ranks[r]["final"], f"rank {r} three steps after the resume")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_loads_the_same_state_at_1_and_3_ranks(saved, world_size: int) -> None:
    root, ranks = saved
    for r, got in enumerate(run_ranks(workers.load_only, world_size, str(root), timeout=180)):
        same(got, ranks[0]["at_save"], f"rank {r} of {world_size}")


@pytest.mark.slow
def test_rank_0_only_layout_still_available(tmp_path: Path) -> None:
    ranks = run_ranks(workers.save_and_continue, 2, str(tmp_path / "run"), False, timeout=180)
    ckpt = tmp_path / "run" / "step_000000003"
    keys = shard_keys(ckpt)
    # rank 1 writes only what is its own (its RNG state), no parameter or optimizer state
    assert not any(k.startswith(("model.", "optimizer.")) for k in keys.get("rank_00001.safetensors", set()))
    got = run_ranks(workers.load_only, 2, str(tmp_path / "run"), timeout=180)
    same(got[1], ranks[0]["at_save"], "rank 1")
