"""Issue 20 on real ranks: 16 gloo ranks save an FSDP2 model + AdamW state in metadata format 2,
restore it at 16, reshard it 16 → 4, and a 4-rank checkpoint 4 → 16, bit-identical to the
full state the saving job gathered. metadata.json describes the Shard(0)/Shard(1) tensors by
rules (no per-chunk records), and each restoring rank reads only the rank indexes of the files
that hold its chunks, never all of them."""

from __future__ import annotations

import json
from pathlib import Path

import _meta16_workers as workers
import pytest
from support.dist import run_ranks

from dist_ckpt.format import metadata_json

pytestmark = pytest.mark.slow


def _save(root: Path, ws: int) -> tuple[str, str]:
    ckpt, ref = str(root / f"fsdp_ws{ws}" / "step_000000003"), str(root / f"fsdp_ws{ws}.ref.pt")
    results = run_ranks(workers.save_job, ws, ckpt, ref, timeout=400)
    info = results[0]
    assert info["world_size"] == ws
    assert info["files"] == sorted(
        [f"rank_{r:05d}.safetensors" for r in range(ws)] + [f"index_{r:05d}.safetensors" for r in range(ws)]
    )
    return ckpt, ref


def test_16_ranks_save_restore_and_reshard_16_to_4_and_4_to_16(tmp_path: Path) -> None:
    ckpt16, ref16 = _save(tmp_path, 16)
    ckpt4, ref4 = _save(tmp_path, 4)

    doc = json.loads((Path(ckpt16) / "metadata.json").read_text())
    assert doc["format"] == "dist_ckpt.checkpoint/2" and doc["counts"]["ranks"] == 16
    layouts = {fqn: next(k for k in ("on", "split", "chunks") if k in t) for fqn, t in doc["tensors"].items()}
    # 7 rows over 16 ranks: one rule (the chunks DCP recorded: FSDP2 leaves the empty ones out)
    assert doc["tensors"]["model.3.weight"]["split"][:2] == [0, 0]
    rows = metadata_json.loads((Path(ckpt16) / "metadata.json").read_bytes(), "metadata.json").tensors["model.3.weight"]
    assert sorted((c.offsets[0], c.sizes[0]) for c in rows.chunks if c.sizes[0]) == [(r, 1) for r in range(7)]
    assert doc["tensors"]["model.0.weight"]["split"] == [1, 0, 16, 1]  # Shard(1): 16 columns over 16 ranks
    assert "chunks" not in layouts.values(), {k: v for k, v in layouts.items() if v == "chunks"}
    per_chunk_records = sum(len(t.get("chunks", ())) for t in doc["tensors"].values())
    assert per_chunk_records == 0 and "checksum" not in json.dumps(doc["tensors"])

    # 16 -> 16 and 4 -> 16 (one 16-rank job), then 16 -> 4
    at16 = run_ranks(workers.load_and_report, 16, [(ckpt16, ref16), (ckpt4, ref4)], timeout=400)
    at4 = run_ranks(workers.load_and_report, 4, [(ckpt16, ref16)], timeout=400)
    for rank, (same, from4) in enumerate(at16):
        assert same["meta"]["step"] == 3 and from4["meta"]["world_size"] == 4
        # same world size: its own shard's index, plus rank 0's (replicated state is written once, by rank 0)
        assert set(same["indexes_read"]) <= {f"rank_{rank:05d}.safetensors", "rank_00000.safetensors"}, same
    # 4 -> 16: a rank's parts of different tensors may lie in different 4-rank files (rows of a
    # 20-row layer and of a 7-row layer split differently), so up to all 4 — but the last ranks
    # hold only a column of the first weight and replicated state: two files
    assert min(len(from4["indexes_read"]) for _, from4 in at16) <= 2, [f["indexes_read"] for _, f in at16]
    for rank, (from16,) in enumerate(at4):
        read = from16["indexes_read"]
        # a quarter of each tensor spans a few of the 16 files (4 for the column-sharded weight,
        # 2–3 for the row-sharded ones, rank 0's for replicated state): never all 16
        assert 1 <= len(read) <= 10, (rank, read)
