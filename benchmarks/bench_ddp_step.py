"""DDP step time with DDP's defaults vs ``find_unused_parameters=True``: what users no longer pay.

    python benchmarks/bench_ddp_step.py [--ranks 2 4] [--rounds 11] [--steps 20] [--out FILE]

Before issue 19, bit-exact resume with DDP on more than 2 ranks needed
``find_unused_parameters=True`` (it disables DDP's bucket rebuild); dist_ckpt now restores the
rebuilt bucket layout, so DDP's defaults resume exactly. ``find_unused_parameters=True`` costs a
traversal of the autograd graph after every forward and an all-reduce of the used-parameter map
in every backward.

Each world size runs under torchrun (gloo, CPU, ``OMP_NUM_THREADS=1``). Every rank builds the
same model twice — an MLP of ``--depth`` ``Linear(width, width)`` + ReLU layers — once wrapped
``DDP(model)`` and once ``DDP(model, find_unused_parameters=True)``, and trains each (forward,
backward, SGD step) in interleaved rounds: in each round both variants run ``--steps`` steps
(after warm-up steps), in alternating order, so a slow spell of the shared machine hits both.
A round's time is the mean step time of the slowest rank. Prints JSON: per world size, each
variant's median / min / max over rounds, and the ratio find_unused / defaults (median of the
per-round ratios, with their range, and the ratio of the fastest rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {"defaults": {}, "find_unused_parameters": {"find_unused_parameters": True}}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def model() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(args.depth):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(args.width, 1))

    ddps = {name: DDP(model(), **kw) for name, kw in VARIANTS.items()}
    opts = {name: torch.optim.SGD(d.parameters(), lr=1e-3) for name, d in ddps.items()}
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))

    def steps(name: str, n: int) -> float:
        ddp, opt = ddps[name], opts[name]
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed = torch.tensor([(time.perf_counter() - t0) / n])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        return float(elapsed)

    for name in ddps:
        steps(name, args.warmup)  # includes DDP's one-time bucket rebuild
    rounds: dict[str, list[float]] = {name: [] for name in ddps}
    for r in range(args.rounds):
        order = list(ddps) if r % 2 == 0 else list(reversed(ddps))
        for name in order:
            rounds[name].append(steps(name, args.steps))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(rounds, f)
    dist.destroy_process_group()


def summarize(rounds: dict[str, list[float]]) -> dict[str, object]:
    out: dict[str, object] = {
        name: {
            "median_ms": round(1e3 * statistics.median(v), 3),
            "min_ms": round(1e3 * min(v), 3),
            "max_ms": round(1e3 * max(v), 3),
            "rounds_ms": [round(1e3 * t, 3) for t in v],
        }
        for name, v in rounds.items()
    }
    ratios = [u / d for u, d in zip(rounds["find_unused_parameters"], rounds["defaults"])]
    out["ratio_find_unused_vs_defaults"] = {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "of_fastest_rounds": round(min(rounds["find_unused_parameters"]) / min(rounds["defaults"]), 3),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    load_before = os.getloadavg()
    results = {}
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rounds.json")
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(world),
                __file__,
                "--worker",
                "--out",
                out,
                *(f"--{k}={getattr(args, k)}" for k in ("rounds", "steps", "warmup", "depth", "width", "batch")),
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
            with open(out) as f:
                results[str(world)] = summarize(json.load(f))
    import torch

    doc = json.dumps(
        {
            "benchmark": "ddp_step",
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "model": {
                "depth": args.depth,
                "width": args.width,
                "batch": args.batch,
                "parameters": args.depth * (args.width * args.width + args.width) + args.width + 1,
            },
            "method": f"{args.rounds} interleaved rounds of {args.steps} steps per variant after {args.warmup} warm-up "
            "steps; a round's time is the slowest rank's mean step time; gloo on CPU, OMP_NUM_THREADS=1",
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
            },
            "results_by_world_size": results,
        },
        indent=1,
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(doc + "\n")
    print(doc)


if __name__ == "__main__":
    main()
