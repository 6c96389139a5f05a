"""`make bench`: run every benchmark, store each JSON as results/<date>-<name>.json, draw plots.

    python benchmarks/run_all.py [--only NAME,...] [--quick]

    NAME: save, compress, zipnn, s3, s3_connector, async, scaling, save_noop, ddp_step,
    cli_startup, async_peers, ddp_spread, async_sweep

Each benchmark script prints one JSON document; see benchmarks/README.md for what each
measures and which anchors it is compared with. ``--quick`` uses smaller states.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (full args, --quick args)
    "save": (["bench_save.py"], ["bench_save.py", "--mb", "128"]),
    "compress": (["bench_compress.py"], ["bench_compress.py"]),
    "zipnn": (["bench_zipnn.py"], ["bench_zipnn.py", "--rounds", "3", "--steps", "2"]),
    "s3": (["bench_s3.py"], ["bench_s3.py", "--mb", "64"]),
    "s3_connector": (["bench_s3_connector.py"], ["bench_s3_connector.py", "--mb", "64", "--rounds", "3"]),
    "async": (["bench_async.py"], ["bench_async.py", "--mb", "64"]),
    "compressed_save": (["bench_compressed_save.py"], ["bench_compressed_save.py", "--mb", "32"]),
    "scaling": (["bench_scaling.py"], ["bench_scaling.py", "--mb-per-rank", "32"]),
    "cli_startup": (["bench_cli_startup.py"], ["bench_cli_startup.py", "--rounds", "5"]),
    "save_noop": (["bench_save_noop.py"], ["bench_save_noop.py", "--rounds", "5"]),
    "incremental": (["bench_incremental.py"], ["bench_incremental.py", "--saves", "4", "--no-s3"]),
    "ddp_step": (
        ["bench_ddp_step.py", "--steps", "50", "--rounds", "15"],
        ["bench_ddp_step.py", "--steps", "20", "--rounds", "5"],
    ),
    "async_peers": (
        ["bench_async_peers.py", "--mb", "32", "--rounds", "2", "--saves", "4"],
        ["bench_async_peers.py", "--mb", "16", "--rounds", "1", "--saves", "3"],
    ),
    "ddp_spread": (
        ["bench_ddp_spread.py", "--mb", "64", "--rounds", "11"],
        ["bench_ddp_spread.py", "--mb", "16", "--rounds", "3"],
    ),
}


SWEEP_MB = (32, 64, 128)
SWEEP_METHODS = ("copy_floor", "ours_thread", "dcp_async_thread")


def async_sweep(quick: bool) -> str:
    """Stall per save against state size: bench_async at several sizes, one JSON with a
    ``stall_vs_size`` series per method (median stall of saves 2..N, slower rank)."""
    series: dict[str, dict[str, float]] = {m: {} for m in SWEEP_METHODS}
    for mb in SWEEP_MB[:2] if quick else SWEEP_MB:
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / "bench_async.py"),
                "--mb",
                str(mb),
                "--saves",
                "4",
                "--methods",
                *SWEEP_METHODS,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results = json.loads(proc.stdout)["results"]
        for method in SWEEP_METHODS:
            series[method][str(mb)] = results[method]["stall_s"]["median"]
    return json.dumps(
        {
            "benchmark": "async_sweep",
            "date": datetime.date.today().isoformat(),
            "sizes_mb_per_rank": list(SWEEP_MB),
            "stall_vs_size": series,
        },
        indent=1,
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join([*BENCHES, "async_sweep"]))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    today = datetime.date.today().isoformat()
    failed = []
    for name in args.only.split(","):
        if name == "async_sweep":
            try:
                (HERE / "results" / f"{today}-async_sweep.json").write_text(async_sweep(args.quick))
            except (subprocess.CalledProcessError, KeyError, ValueError) as e:
                print(f"bench: async_sweep failed: {e}", file=sys.stderr)
                failed.append(name)
            continue
        full, quick = BENCHES[name]
        script, *rest = quick if args.quick else full
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *rest], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"bench: {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            failed.append(name)
            continue
        out = HERE / "results" / f"{today}-{name}.json"
        out.write_text(proc.stdout)
        print(f"bench: {name} -> {out}", file=sys.stderr)
    subprocess.run([sys.executable, str(HERE / "plots.py")], check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
