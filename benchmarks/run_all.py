"""`make bench`: run every benchmark, store each JSON as results/<date>-<name>.json, draw plots.

    python benchmarks/run_all.py [--only save,compress,s3,async,scaling] [--quick]

Each benchmark script prints one JSON document; see benchmarks/README.md for what each
measures and which anchors it is compared with. ``--quick`` uses smaller states.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (full args, --quick args)
    "save": (["bench_save.py"], ["bench_save.py", "--mb", "128"]),
    "compress": (["bench_compress.py"], ["bench_compress.py"]),
    "s3": (["bench_s3.py"], ["bench_s3.py", "--mb", "64"]),
    "async": (["bench_async.py"], ["bench_async.py", "--mb", "64"]),
    "scaling": (["bench_scaling.py"], ["bench_scaling.py", "--mb-per-rank", "32"]),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    today = datetime.date.today().isoformat()
    failed = []
    for name in args.only.split(","):
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
