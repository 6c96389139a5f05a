"""Weak scaling: save and load time with a fixed state size per rank at 1, 2 and 4 ranks.

    python benchmarks/bench_scaling.py [--mb-per-rank 64] [--ranks 1 2 4]

Each world size runs under torchrun (gloo, CPU). Every rank holds ``--mb-per-rank`` MB in 16
tensors and saves with ``dist_ckpt.save`` (sync, codec none) to a local temp dir, best of 3;
then loads it back. Prints JSON: per world size, the save and load wall time (max over ranks),
the aggregate throughput, and the time relative to 1 rank. On a machine with fewer cores than
ranks the ranks share cores and disk, so flat time per rank is not expected; the core count is
reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(mb: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import dist_ckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = mb * 1024 * 1024 // 4 // 16
    state = {f"t{i}.rank{rank}": torch.randn(n) for i in range(16)}
    root = os.environ["BENCH_ROOT"]
    saves, loads = [], []
    for attempt in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        dist_ckpt.save(state, f"{root}/step_{attempt:09d}")
        dist.barrier()
        saves.append(time.perf_counter() - t0)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        dist.barrier()
        t0 = time.perf_counter()
        dist_ckpt.load(target, f"{root}/step_{attempt:09d}")
        dist.barrier()
        loads.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": world, "save_s": min(saves), "load_s": min(loads)}, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb-per-rank", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.mb_per_rank, args.out)
        return
    results = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
            out = os.path.join(tmp, "result.json")
            env = {**os.environ, "BENCH_ROOT": os.path.join(tmp, "run"), "OMP_NUM_THREADS": "1"}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    str(world),
                    __file__,
                    "--worker",
                    "--mb-per-rank",
                    str(args.mb_per_rank),
                    "--out",
                    out,
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            with open(out) as f:
                results.append(json.load(f))
    base = results[0]
    for r in results:
        total_mb = args.mb_per_rank * r["world_size"]
        r["save_MBps_aggregate"] = round(total_mb / r["save_s"], 1)
        r["load_MBps_aggregate"] = round(total_mb / r["load_s"], 1)
        r["save_time_vs_1_rank"] = round(r["save_s"] / base["save_s"], 2)
        r["load_time_vs_1_rank"] = round(r["load_s"] / base["load_s"], 2)
    print(
        json.dumps(
            {
                "benchmark": "weak_scaling",
                "cpu_cores": os.cpu_count(),
                "mb_per_rank": args.mb_per_rank,
                "date": time.strftime("%Y-%m-%d"),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
