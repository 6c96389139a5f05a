"""Async stall against state size: ``bench_async.py`` at several sizes per rank (2 ranks), each
with interleaved rounds of the copy floor and ``async_save=True`` (and, with ``--baseline-tree``,
another checkout's package side by side). Prints one JSON: per size, the stall statistics of
each method (saves 2..N of every round, the slower rank; the training loop running and idle)
and the stall over the copy floor per round with its median and range.

    python benchmarks/bench_async_sweep.py [--mb 32 64 128] [--rounds 3] [--saves 6]
                                           [--baseline-tree DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEEP = ("stall_s", "stall_s_loop_idle", "gc_s_in_save", "submit_breakdown_rank0_last")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=6)
    p.add_argument("--baseline-tree", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sizes: dict[str, Any] = {}
    load_before = os.getloadavg()
    for mb in args.mb:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, str(HERE / "bench_async.py"), "--mb", str(mb), "--saves", str(args.saves)]
            cmd += ["--rounds", str(args.rounds), "--methods", "copy_floor", "ours_thread", "--out", tmp.name]
            if args.baseline_tree:
                cmd += ["--baseline-tree", args.baseline_tree]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            doc = json.loads(Path(tmp.name).read_text())
        sizes[str(mb)] = {
            "results": {m: {k: r[k] for k in KEEP if k in r} for m, r in doc["results"].items()},
            "stall_over_copy_floor_per_round": {
                m: t.get("stall_over_copy_floor") for m, t in doc["targets_per_round"].items()
            },
            "stall_over_copy_floor_of_medians": {m: t["stall_over_copy_floor"] for m, t in doc["targets"].items()},
            "load": doc["rounds"][-1]["load"],
        }
        print(f"{mb} MB/rank done", file=sys.stderr)
    out = {
        "benchmark": "bench_async_sweep",
        "date": datetime.date.today().isoformat(),
        "config": {
            "mb_per_rank": args.mb,
            "rounds": args.rounds,
            "saves": args.saves,
            "ranks": 2,
            "baseline_tree": args.baseline_tree,
            "target": "stall <= 1.3x the copy floor at 32-128 MB/rank (issue 15)",
        },
        "host": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "sizes": sizes,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
