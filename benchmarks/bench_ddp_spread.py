"""DDP save at 2 ranks: parameters and optimizer state spread over the ranks
(``ddp_spread_writes=True``, the default) against rank 0 writing every replicated tensor (the
layout before), to local disk (fsync on) and to S3 (SeaweedFS on loopback).

    python benchmarks/bench_ddp_spread.py [--mb 64] [--rounds 5] [--targets local s3] [--out FILE]

One torchrun job of 2 ranks per target: a DDP model of ``--mb`` MB of fp32 parameters
(Linear layers and a BatchNorm) with AdamW state (about 3x in all), trained a few steps; then
``--rounds`` rounds, each saving the same state once per layout, in alternating order
(synchronous ``save()``, each layout into its own run root). Per save: ``save_s``, the slower
rank's time in ``save()`` (until the checkpoint is committed and in the manifest), and the
bytes each rank's shard file holds. Medians and ranges over the rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1024


def worker(target_root: str, mb: int, rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sys.path.insert(0, str(ROOT))
    from dist_ckpt import CheckpointManager

    torch.manual_seed(0)
    layers = max(1, mb * 2**20 // (4 * (WIDTH * WIDTH + WIDTH)))
    body = [m for _ in range(layers) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    model = DistributedDataParallel(nn.Sequential(*body, nn.BatchNorm1d(WIDTH)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        loss = model(torch.randn(16, WIDTH, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    managers = {
        spread: CheckpointManager(
            f"{target_root}/{'spread' if spread else 'rank0'}", ddp_spread_writes=spread, keep_last=2
        )
        for spread in (True, False)
    }
    states = {spread: mgr.track(model=model, optimizer=opt) for spread, mgr in managers.items()}
    result: dict[str, Any] = {"spread": [], "rank0": []}
    took = torch.zeros(1, dtype=torch.float64)
    for i in range(rounds):
        for spread in (True, False) if i % 2 == 0 else (False, True):
            mgr = managers[spread]
            dist.barrier()
            t = time.perf_counter()
            mgr.save(i, states[spread], force=True)
            took[0] = time.perf_counter() - t
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            sizes = {}
            if rank == 0:
                prefix = f"step_{i:09d}/"
                sizes = {
                    o.key.rsplit("/", 1)[-1]: o.size for o in mgr.backend.list(prefix) if o.key.endswith(".safetensors")
                }
            result["spread" if spread else "rank0"].append({"save_s": float(took[0]), "shard_bytes": sizes})
    for mgr in managers.values():
        mgr.close()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def summarise(saves: list[dict[str, Any]]) -> dict[str, Any]:
    times = [s["save_s"] for s in saves]
    last = saves[-1]["shard_bytes"]
    return {
        "save_s": {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)},
        "bytes_per_rank_file": dict(sorted(last.items())),
        "bytes_total": sum(last.values()),
    }


def run(target: str, root: str, args: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    out = workdir / f"{target}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        "--worker",
        root,
        "--mb",
        str(args.mb),
        "--rounds",
        str(args.rounds),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        timeout=args.timeout,
    )
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    raw = json.loads(out.read_text())
    res = {layout: summarise(saves) for layout, saves in raw.items()}
    res["spread_over_rank0_save_s"] = res["spread"]["save_s"]["median"] / res["rank0"]["save_s"]["median"]
    paired = [a["save_s"] / b["save_s"] for a, b in zip(raw["spread"], raw["rank0"])]  # the same round's pair
    res["spread_over_rank0_per_round"] = {
        "median": statistics.median(paired),
        "min": min(paired),
        "max": max(paired),
        "all": paired,
    }
    res["raw"] = raw
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--targets", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.mb, args.rounds, args.out)
        return
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ddp-spread-", dir="/tmp"))
    results: dict[str, Any] = {}
    server_version = None
    for target in args.targets:
        if target == "local":
            results[target] = run(target, str(workdir / "runs"), args, {}, workdir)
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from support.s3server import start_seaweedfs

            server = start_seaweedfs(workdir / "weed")
            server_version = server.version
            try:
                bucket = server.create_bucket("bench-ddp-spread")
                results[target] = run(target, f"s3://{bucket}/runs", args, server.env(), workdir)
            finally:
                server.stop()
        print(f"{target}: done", file=sys.stderr)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "benchmark": "ddp_spread",
        "date": datetime.date.today().isoformat(),
        "config": {
            "param_mb": args.mb,
            "ranks": 2,
            "rounds": args.rounds,
            "save": "synchronous save(), fsync on (local)",
            "s3_server": server_version,
        },
        "host": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": results,
        "notes": [
            "2 ranks on a 2-CPU VM shared with other jobs; S3 is SeaweedFS on the same machine (loopback), so "
            "its server competes with both writers for the CPUs and the disk."
        ],
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
