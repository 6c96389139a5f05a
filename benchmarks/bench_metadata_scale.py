"""Checkpoint metadata at scale, simulated (no process group): issue 20.

    python benchmarks/bench_metadata_scale.py [--ranks 64 256 1024 4096] [--baseline-ranks 64 256]
        [--coordinator-baseline-ranks 64] [--rounds 3]

A 70B-shaped state (Llama-2-70B: 80 layers, hidden 8192, GQA k/v 1024, MLP 28672, vocab 32000:
723 parameters in bf16, AdamW ``exp_avg``/``exp_avg_sq`` in fp32: 2,169 tensors), every tensor
split on dim 0 over all ranks as FSDP2 (DTensor ``Shard(0)``, ``torch.chunk`` sizes) does. For
each world size the DCP :class:`Metadata` the coordinator holds after DCP's global plan is built
once, then per round, interleaved:

- ``coordinator_save`` (:mod:`_coordinator_sim`): everything rank 0 does at save between DCP's
  gather of the local plans and the commit, with compact plans (ours) and DCP's per-chunk plans
  (``--coordinator-baseline-ranks``; estimated beyond), each without and with DCP's plan caching;
- ``v2`` (ours, format 2): coordinator write = ``metadata_v2.dumps`` from the ``Metadata`` the
  coordinator holds after compact plans (a rule per tensor, one write result per rank);
  ``coordinator_write_from_per_chunk_plans_s``: the same document from DCP's per-chunk
  ``Metadata`` and a result per chunk (dist_ckpt before compact plans); what a restoring rank
  reads = metadata.json + its own rank index file (the one file that holds its chunks at the
  same world size); parse = ``metadata_json.loads`` of metadata.json + the index's JSON.
  Also reported: ``dcp_view_s``, DCP's ``Metadata`` view over the parsed records (chunks and
  storage computed on access), and ``plan_s``, finding for every tensor the saved chunks that
  overlap one rank's part (what the load planner hands DCP; arithmetic on the rule).
- ``v1`` (today's format 1, ``metadata_json.dumps``/``loads``) and ``dcp`` (DCP's pickled
  ``.metadata`` with FileSystemWriter's ``_StorageInfo`` per chunk; ``pickle.loads`` to parse),
  measured at ``--baseline-ranks`` only (at 1,024 ranks format 1 is ~640 MB of JSON: more than
  the memory this shared machine can spare). Larger world sizes list an estimate from the
  per-chunk size measured at the largest baseline world size, marked ``"estimated": true``.

Prints JSON (medians with min/max over rounds). Target (issue 20): at 1,024 ranks at most
16 MiB read by any rank and at most 1 s parse.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _coordinator_sim import Coordinator  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402
from torch.distributed.checkpoint.metadata import (  # noqa: E402
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from dist_ckpt import compact_plan  # noqa: E402
from dist_ckpt.format import chunk_layout, dcp_view, metadata_json, metadata_v2  # noqa: E402
from dist_ckpt.format.chunk_layout import SplitRule  # noqa: E402
from dist_ckpt.format.metadata_json import EntryRef, FileRecord  # noqa: E402
from dist_ckpt.format.rank_index import index_entry, index_name  # noqa: E402
from dist_ckpt.format.shard import save_shard  # noqa: E402
from storage_backends.local import LocalBackend  # noqa: E402

HIDDEN, KV, MLP, VOCAB, LAYERS = 8192, 1024, 28672, 32000, 80
MiB = 1 << 20
SUM = "0123456789abcdef"
FILE_SUM = "xxh3_128:" + "0" * 32 + ":" + "1" * 32


def params() -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def tensors() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for name, shape in params():
        out.append((name, shape, torch.bfloat16))
        out += [(f"optim.state.{name}.{m}", shape, torch.float32) for m in ("exp_avg", "exp_avg_sq")]
    return out


def shard0(shape: tuple[int, ...], world: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """DTensor Shard(0) boxes (torch.chunk sizes; empty trailing chunks at offset n)."""
    n, cs = shape[0], -(-shape[0] // world)
    return [
        ((min(r * cs, n), *(0,) * (len(shape) - 1)), (max(0, min(cs, n - r * cs)), *shape[1:])) for r in range(world)
    ]


def shard0_box(shape: tuple[int, ...], world: int, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rank ``r``'s box of :func:`shard0` (without building every rank's)."""
    n, cs = shape[0], -(-shape[0] // world)
    return (min(r * cs, n), *(0,) * (len(shape) - 1)), (max(0, min(cs, n - r * cs)), *shape[1:])


class State:
    """The coordinator's view after DCP's global plan, and what ``finish`` receives."""

    def __init__(self, world: int):
        self.world = world
        self.sd_meta: dict[str, Any] = {}
        self.results: list[list[tuple[str, tuple[int, ...], int]]] = [[] for _ in range(world)]  # (fqn, offsets, rank)
        for fqn, shape, dtype in tensors():
            boxes = shard0(shape, world)
            chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
            self.sd_meta[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), chunks)
            for r, (_o, _) in enumerate(boxes):
                self.results[r].append((fqn, chunks[r].offsets, r))
        self.files = {
            f"rank_{r:05d}.safetensors": FileRecord(r, 10**9, FILE_SUM, f"index_{r:05d}.safetensors")
            for r in range(world)
        }
        self.files.update({f"index_{r:05d}.safetensors": FileRecord(r, 200_000, FILE_SUM) for r in range(world)})

    def metadata(self, storage: dict | None = None) -> Metadata:
        return Metadata(state_dict_metadata=self.sd_meta, planner_data={}, storage_data=storage)


def v2_write(st: State) -> bytes:
    """metadata.json as the coordinator builds it now (compact plans): from one rule per
    tensor, with one write result per rank."""
    sd = {
        fqn: TensorStorageMetadata(
            md.properties,
            md.size,
            compact_plan.RuledChunks(SplitRule(tuple(md.size), 0, 0, st.world, -(-md.size[0] // st.world))),
        )
        for fqn, md in st.sd_meta.items()
    }
    first = next(iter(st.sd_meta))
    chunk_ranks = {(first, st.results[r][0][1]): r for r in range(st.world)}
    meta = Metadata(state_dict_metadata=sd, planner_data={})
    return metadata_v2.dumps(meta, chunk_ranks, {}, st.files, st.world, "none", {"torch": torch.__version__})


def v2_write_per_chunk(st: State) -> bytes:
    """The same document from DCP's per-chunk plans (dist_ckpt before compact plans): a pass
    over every write result, then a rule check over every chunk."""
    chunk_ranks = {}
    for rank_results in st.results:  # what DistCkptWriter.finish does per write result
        for fqn, offsets, rank in rank_results:
            chunk_ranks[fqn, offsets] = rank
    return metadata_v2.dumps(st.metadata(), chunk_ranks, {}, st.files, st.world, "none", {"torch": torch.__version__})


def v1_write(st: State) -> bytes:
    storage = {}
    for rank_results in st.results:
        for fqn, offsets, rank in rank_results:
            name = chunk_layout.entry_name(fqn, offsets)
            storage[MetadataIndex(fqn, torch.Size(offsets))] = EntryRef(
                f"rank_{rank:05d}.safetensors", name, SUM, 10**8
            )
    files = {k: FileRecord(v.rank, v.size, v.checksum) for k, v in st.files.items() if k.startswith("rank_")}
    return metadata_json.dumps(st.metadata(storage), files, st.world, "none", {"torch": torch.__version__})


def dcp_write(st: State) -> bytes:
    storage = {}
    for rank_results in st.results:
        for pos, (fqn, offsets, rank) in enumerate(rank_results):
            storage[MetadataIndex(fqn, torch.Size(offsets))] = _StorageInfo(f"__{rank}_0.distcp", pos * 10**8, 10**8)
    return pickle.dumps(st.metadata(storage), protocol=pickle.HIGHEST_PROTOCOL)


def rank_index_bytes(st: State, rank: int, tmp: str) -> tuple[bytes, int]:
    """Rank ``rank``'s index (its JSON, and the size of the index file as written)."""
    names = [chunk_layout.entry_name(fqn, o) for fqn, o, _ in st.results[rank]]
    entry = index_entry(f"rank_{rank:05d}.safetensors", dict.fromkeys(names, SUM), dict.fromkeys(names, 10**8))
    written = save_shard(LocalBackend(tmp), index_name(f"rank_{rank:05d}.safetensors"), [entry], None)
    return bytes(entry.data), written.size


def plan_one_rank(meta: Any, rank: int, world: int) -> int:
    """Per tensor, the saved chunks overlapping ``rank``'s Shard(0) part (as narrow_for does)."""
    found = 0
    for _fqn, md in dcp_view.dcp_metadata(meta).state_dict_metadata.items():
        offsets, sizes = shard0_box(tuple(md.size), world, rank)
        found += len(md.chunks.overlapping(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))))
    return found


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def run_world(world: int, rounds: int, baselines: bool, tmp: str, coord_baseline: bool = False) -> dict[str, Any]:
    st = State(world)
    chunks = sum(len(m.chunks) for m in st.sd_meta.values())
    idx_json, idx_file = rank_index_bytes(st, world // 2, tmp)
    t: dict[str, list[float]] = {
        k: []
        for k in (
            "v2_write",
            "v2_write_per_chunk",
            "v2_parse",
            "v2_dcp_view",
            "v2_plan",
            "v1_write",
            "v1_parse",
            "dcp_write",
            "dcp_parse",
        )
    }
    sizes: dict[str, int] = {}
    coord = Coordinator(tensors(), [name for name, _ in params()], world, per_chunk=coord_baseline)
    modes = ["compact", "compact_cached"] + (["per_chunk", "per_chunk_cached"] if coord_baseline else [])
    coord_runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            gc.collect()
            coord_runs[mode].append(coord.run(mode, tmp))
        dt, doc = timed(v2_write_per_chunk, st)
        t["v2_write_per_chunk"].append(dt)
        dt, doc2 = timed(v2_write, st)
        t["v2_write"].append(dt)
        assert json.loads(doc) == json.loads(doc2), "metadata.json differs between compact and per-chunk plans"
        sizes["v2"] = len(doc)
        del doc2
        dt, meta = timed(lambda: (metadata_json.loads(doc, "metadata.json"), json.loads(idx_json))[0])
        t["v2_parse"].append(dt)
        t["v2_dcp_view"].append(timed(lambda: dcp_view.dcp_metadata(meta))[0])  # noqa: F821 (bound above; ruff is misled by the del below)
        t["v2_plan"].append(timed(plan_one_rank, meta, world // 2, world)[0])
        del doc, meta
        if baselines:
            dt, doc = timed(v1_write, st)
            t["v1_write"].append(dt)
            sizes["v1"] = len(doc)
            t["v1_parse"].append(timed(metadata_json.loads, doc, "metadata.json")[0])
            del doc
            dt, doc = timed(dcp_write, st)
            t["dcp_write"].append(dt)
            sizes["dcp"] = len(doc)
            t["dcp_parse"].append(timed(pickle.loads, doc)[0])
            del doc
    out: dict[str, Any] = {
        "world_size": world,
        "tensors": len(st.sd_meta),
        "chunks": chunks,
        "v2": {
            "metadata_json_bytes": sizes["v2"],
            "rank_index_file_bytes": idx_file,
            "read_by_any_rank_bytes": sizes["v2"] + idx_file,
            "read_by_any_rank_MiB": round((sizes["v2"] + idx_file) / MiB, 3),
            "coordinator_write_s": summary(t["v2_write"]),
            "coordinator_write_from_per_chunk_plans_s": summary(t["v2_write_per_chunk"]),
            "per_rank_parse_s": summary(t["v2_parse"]),
            "dcp_view_s": summary(t["v2_dcp_view"]),
            "plan_s": summary(t["v2_plan"]),
        },
    }
    out["coordinator_save"] = {
        mode: {
            "items_received": runs[0]["items_received"],
            "results_received": runs[0]["results_received"],
            **{k: summary([r[k] for r in runs]) for k in ("receive_s", "plan_s", "finish_s", "total_s")},
        }
        for mode, runs in coord_runs.items()
    }
    del coord
    if baselines:
        out["v1"] = {
            "read_by_any_rank_bytes": sizes["v1"],
            "read_by_any_rank_MiB": round(sizes["v1"] / MiB, 3),
            "bytes_per_chunk": round(sizes["v1"] / chunks, 1),
            "coordinator_write_s": summary(t["v1_write"]),
            "per_rank_parse_s": summary(t["v1_parse"]),
        }
        out["dcp"] = {
            "read_by_any_rank_bytes": sizes["dcp"],
            "read_by_any_rank_MiB": round(sizes["dcp"] / MiB, 3),
            "bytes_per_chunk": round(sizes["dcp"] / chunks, 1),
            "coordinator_write_s": summary(t["dcp_write"]),
            "per_rank_parse_s": summary(t["dcp_parse"]),
        }
        out["ratio_read_bytes_v1_over_v2"] = round(sizes["v1"] / (sizes["v2"] + idx_file), 1)
        out["ratio_parse_v1_over_v2"] = round(statistics.median(t["v1_parse"]) / statistics.median(t["v2_parse"]), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--baseline-ranks", type=int, nargs="+", default=[64, 256])
    p.add_argument(
        "--coordinator-baseline-ranks",
        type=int,
        nargs="+",
        default=[64],
        help="world sizes at which the coordinator's work is also measured with DCP's per-chunk plans",
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results, per_chunk, per_item = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            row = run_world(
                world, args.rounds, world in args.baseline_ranks, tmp, world in args.coordinator_baseline_ranks
            )
            cs = row["coordinator_save"]
            if "per_chunk" in cs:  # seconds per item received or result gathered, for the estimates beyond
                per_item = {
                    m: cs[m]["total_s"]["median"] / (cs[m]["items_received"] + cs[m]["results_received"])
                    for m in ("per_chunk", "per_chunk_cached")
                }
            elif per_item:
                items = row["chunks"] + 735 * world  # every chunk and every rank's unruled items
                for m, sec in per_item.items():
                    cs[m] = {
                        "estimated": True,
                        "total_s": round(sec * (items * (m == "per_chunk") + row["chunks"] + 735), 1),
                    }
            if "v1" in row:
                per_chunk = {
                    k: (row[k]["bytes_per_chunk"], row[k]["per_rank_parse_s"]["median"] / row["chunks"])
                    for k in ("v1", "dcp")
                }
            elif per_chunk:
                for k, (b, s) in per_chunk.items():
                    row[k] = {
                        "estimated": True,
                        "read_by_any_rank_MiB": round(b * row["chunks"] / MiB, 1),
                        "per_rank_parse_s": round(s * row["chunks"], 1),
                    }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    at_1024 = next((r for r in results if r["world_size"] == 1024), None)
    target = None
    if at_1024 is not None:
        v2 = at_1024["v2"]
        target = {
            "read_MiB": v2["read_by_any_rank_MiB"],
            "read_target_MiB": 16,
            "parse_s": v2["per_rank_parse_s"]["median"],
            "parse_target_s": 1.0,
            "met": v2["read_by_any_rank_MiB"] <= 16 and v2["per_rank_parse_s"]["max"] <= 1.0,
        }
    print(
        json.dumps(
            {
                "benchmark": "metadata_scale",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
                "torch": torch.__version__,
                "rounds": args.rounds,
                "results": results,
                "target_1024": target,
                "coordinator_notes": [
                    "coordinator_save: receive (unpickling what DCP gathers: local plans, write results) + plan "
                    "(create_global_plan, prepare_global_plan) + finish (metadata.json written, "
                    "COMMITTED, publish; local disk)",
                    "compact: items_received and results_received grow with tensors + ranks (735 unruled items from "
                    "the coordinator, one result per rank); per_chunk: with tensors x ranks",
                    "still O(ranks) inside DCP, through its public API: one plan object gathered and scattered per "
                    "rank, one result list gathered per rank; plus one all_reduce of two integers "
                    "(the replicated-state agreement)",
                    "still O(ranks x items) where no rule applies: replicated state that differs between ranks "
                    "(each rank sends its own, as DCP does), and tensors no split rule fits (2-D "
                    "meshes, strided shards)",
                    "per_chunk beyond --coordinator-baseline-ranks: estimated from seconds per item "
                    "and result measured there",
                ],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
