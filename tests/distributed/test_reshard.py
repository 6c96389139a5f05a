"""Save at one world size, load at another (gloo on CPU, spawned ranks).

DDP and FSDP2 (``fully_shard``) models with AdamW are trained a few steps and saved through
``get_state_dict`` + ``dist_ckpt.save`` at 2 and at 4 ranks; each checkpoint is loaded at other
world sizes (4 → 2, 4 → 1, 2 → 4, and 4 → 4) into a differently initialised model, and the
full gathered model and optimizer state must equal, tensor for tensor, the reference the saving
job gathered on rank 0. The model has a layer with fewer rows than ranks (empty FSDP shards),
uneven shards, and a weight sharded by columns (loading it at another world size reads
strided boxes out of the saved chunks). Cross-loads (FSDP checkpoint into DDP and back) check that the state is
independent of the wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path

import _reshard_workers as workers
import pytest
from support.dist import RanksFailed, run_ranks

from dist_ckpt.format import metadata_json

KINDS = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[str, str]]:
    """``(kind, world_size) -> (checkpoint uri, reference file)`` for world sizes 2 and 4."""
    root = tmp_path_factory.mktemp("reshard")
    out: dict[tuple[str, int], tuple[str, str]] = {}
    for ws in (2, 4):
        jobs = [(k, str(root / f"{k}_ws{ws}" / "step_000000003"), str(root / f"{k}_ws{ws}.ref.pt")) for k in KINDS]
        results = run_ranks(workers.save_job, ws, jobs, timeout=120)
        for (kind, ckpt, ref), info in zip(jobs, results[0]):
            assert info["world_size"] == ws
            shards = [f for f in info["files"] if f.startswith("rank_")]  # each with its index_NNNNN file
            assert info["files"] == sorted(shards + [f.replace("rank_", "index_") for f in shards]), info
            if kind == "fsdp":  # sharded state: every rank wrote its own part, in parallel
                assert shards == [f"rank_{r:05d}.safetensors" for r in range(ws)], info
            else:  # replicated (DDP) state is written once, by rank 0 (see JsonSavePlanner)
                assert shards == ["rank_00000.safetensors"], info
            assert (Path(ckpt) / "COMMITTED").exists()
            out[kind, ws] = (ckpt, ref)
    return out


def _jobs(saved, pairs):
    return [(load_kind, *saved[save_kind, ws]) for load_kind, save_kind, ws in pairs]


def test_fsdp_shards_hold_only_their_part(saved):
    """At 4 ranks each FSDP shard holds a quarter (rounded) of every sharded parameter, not a
    full copy, and chunk offsets in metadata.json tile the whole tensor."""
    ckpt, _ = saved["fsdp", 4]
    doc = json.loads((Path(ckpt) / "metadata.json").read_text())
    meta = metadata_json.loads((Path(ckpt) / "metadata.json").read_bytes(), "metadata.json")
    w = meta.tensors["model.3.weight"]
    assert w.size == (7, 20)
    rows = sorted((c.offsets[0], c.sizes[0]) for c in w.chunks)
    assert rows == [(0, 2), (2, 2), (4, 2), (6, 1)]
    assert sorted({c.ref.file for c in w.chunks}) == [f"rank_{r:05d}.safetensors" for r in range(4)]
    # Format 2: Shard(0) over ranks 0..3 is one rule, not four chunk records.
    assert doc["tensors"]["model.3.weight"]["split"] == [0, 0, 4, 2]
    # The first weight is sharded by columns (Shard(1)): 12 columns in 4 chunks of 3.
    w0 = meta.tensors["model.0.weight"]
    assert w0.size == (20, 12) and doc["tensors"]["model.0.weight"]["split"] == [1, 0, 4, 3]
    assert sorted((c.offsets, c.sizes) for c in w0.chunks) == [
        ((0, 0), (20, 3)),
        ((0, 3), (20, 3)),
        ((0, 6), (20, 3)),
        ((0, 9), (20, 3)),
    ]
    # 3 rows over 4 ranks: the chunks still tile rows 0..3 exactly.
    last = meta.tensors["model.5.weight"]
    covered = sorted((c.offsets[0], c.sizes[0]) for c in last.chunks if c.sizes[0])
    assert sum(n for _, n in covered) == 3 and covered[0][0] == 0
    # The AdamW moments are sharded the same way.
    assert len(meta.tensors["optim.state.0.weight.exp_avg"].chunks) == 4


def test_load_4_ranks_into_2(saved):
    pairs = [("ddp", "ddp", 4), ("fsdp", "fsdp", 4), ("ddp", "fsdp", 4), ("fsdp", "ddp", 4)]
    results = run_ranks(workers.load_job, 2, _jobs(saved, pairs), timeout=120)
    assert len(results) == 2 and all(len(r) == len(pairs) for r in results)


def test_load_4_ranks_into_1(saved):
    pairs = [("ddp", "ddp", 4), ("fsdp", "fsdp", 4)]
    results = run_ranks(workers.load_job, 1, _jobs(saved, pairs), timeout=120)
    assert len(results[0]) == len(pairs)


def test_load_2_ranks_into_4_and_4_into_4(saved):
    pairs = [("ddp", "ddp", 2), ("fsdp", "fsdp", 2), ("fsdp", "fsdp", 4)]
    results = run_ranks(workers.load_job, 4, _jobs(saved, pairs), timeout=150)
    assert len(results) == 4


def test_reference_comparison_detects_a_wrong_checkpoint(saved):
    """The check itself has teeth: loading the 2-rank checkpoint but comparing with the 4-rank
    reference (a different training run) must fail on the first differing tensor."""
    ckpt2, _ = saved["fsdp", 2]
    _, ref4 = saved["fsdp", 4]
    with pytest.raises(RanksFailed, match=r"values differ"):
        run_ranks(workers.load_job, 1, [("fsdp", ckpt2, ref4)], timeout=120)
