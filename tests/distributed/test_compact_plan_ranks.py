"""Issue 20 on real ranks: the coordinator's save work is O(tensors + ranks) for FSDP2 state.

4 gloo ranks save an FSDP2 model + AdamW state with compact plans (dist_ckpt's default: the
chunks of a DTensor ``Shard(d)`` over a 1-D mesh stay on their rank, the coordinator gets one
rule per tensor, and replicated state only from rank 0 once the ranks agree they hold the same) and, the same
state, with DCP's per-chunk plans. The coordinator is sent no
item of a ruled tensor, every rank still writes all its chunks, metadata.json says the same,
and the compact checkpoint restores bit for bit at 4 ranks and resharded to 2."""

from __future__ import annotations

import json
from pathlib import Path

import _compact_plan_workers as workers
import _meta16_workers as meta16
from support.dist import run_ranks


def test_compact_plans_send_no_chunk_of_a_ruled_tensor_and_restore_bit_identical(tmp_path: Path) -> None:
    ref = str(tmp_path / "ref.pt")
    results = run_ranks(workers.save_both, 4, str(tmp_path), ref, timeout=300)
    compact, per_chunk = results[0]["compact"], results[0]["per_chunk"]
    ruled = compact["ruled"]
    # every parameter and its exp_avg/exp_avg_sq (FSDP2 DTensors): 3 Linear layers, LayerNorm and
    # BatchNorm affine, weight and bias each = 10 parameters
    assert len([f for f in ruled if f.startswith("model.")]) == 10, ruled
    assert len([f for f in ruled if f.startswith("optim.state.")]) == 20, ruled
    for rank, r in enumerate(results):
        assert r["compact"]["written"] == r["per_chunk"]["written"], rank  # each rank writes the same chunks
        assert r["compact"]["ruled"] == ruled
    # the coordinator: per chunk, every rank's item of every tensor (4 × 57); compact, only rank
    # 0's unruled ones (AdamW's per-parameter `step`, BatchNorm's running stats, values: 27),
    # as every rank holds the same replicated state (agreed by one all_reduce)
    assert per_chunk["coordinator_items"] == 4 * (len(ruled) + 27), per_chunk
    assert compact["coordinator_items"] == 27, compact
    docs = {
        name: json.loads((tmp_path / name / "step_000000003" / "metadata.json").read_text())
        for name in ("compact", "per_chunk")
    }
    assert docs["compact"]["tensors"] == docs["per_chunk"]["tensors"]
    assert docs["compact"]["planner_data"] == docs["per_chunk"]["planner_data"]
    assert all("split" in docs["compact"]["tensors"][f] for f in ruled)

    ckpt = str(tmp_path / "compact" / "step_000000003")
    for ws in (4, 2):
        (loaded,) = run_ranks(meta16.load_and_report, ws, [(ckpt, ref)], timeout=300)[0]
        assert loaded["meta"] == {"step": 3, "world_size": 4}


def test_ranks_holding_different_plain_tensors_each_send_and_write_their_own(tmp_path: Path) -> None:
    """The agreement finds the ranks' unruled items differ: no rank drops any, and a tensor only
    rank 2 holds is saved by rank 2."""
    import torch

    from dist_ckpt.checkpoint_view import CheckpointView

    ckpt = tmp_path / "step_000000001"
    run_ranks(workers.save_rank_own_keys, 3, str(ckpt), timeout=200)
    view = CheckpointView.open(str(ckpt))
    assert torch.equal(view.tensor("shared"), torch.arange(6.0))
    for rank in range(3):
        assert torch.equal(view.tensor(f"only_rank{rank}"), torch.full((3,), float(rank)))
