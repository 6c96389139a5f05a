"""``dist-ckpt verify RUN|CKPT``: completeness and checksums; non-zero exit naming each bad file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dist_ckpt.checkpoint_view import locate
from dist_ckpt.cli.common import BarSink, human_size, print_json, progress_bar
from dist_ckpt.verify import CheckpointReport, RunReport, verify_checkpoint, verify_run

EPILOG = """\
Checks that every file of each checkpoint's file table exists with the recorded size, and that
the xxh3-128 checksums of its header and data match those recorded while writing. For a run,
every committed checkpoint is checked, and manifest.json against the COMMITTED markers.
Exit status 1 when anything is wrong; each bad file is named on stderr.

examples:
  dist-ckpt verify /data/runs/exp1
  dist-ckpt verify s3://bucket/runs/exp1/step_000001000 --quick
  dist-ckpt verify /data/runs/exp1 --json | jq '.checkpoints[] | select(.ok | not)'
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check files and checksums of a run or checkpoint",
        description="Verify a checkpoint, or every checkpoint of a run: all files present with the "
        "right sizes, header and data checksums as recorded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="RUN|CKPT", help="run root or checkpoint folder: a path or s3:// URI")
    p.add_argument("--quick", action="store_true", help="sizes and headers only (no full read of the data)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kind, backend, prefix = locate(args.target)
    with progress_bar(args, "verify") as bar:
        if kind == "checkpoint":
            report: CheckpointReport | RunReport = verify_checkpoint(
                backend, prefix, quick=args.quick, progress=BarSink(bar)
            )
        else:
            report = verify_run(backend, quick=args.quick, progress=BarSink(bar))
    checkpoints = [report] if isinstance(report, CheckpointReport) else report.checkpoints
    run_problems = [] if isinstance(report, CheckpointReport) else report.problems
    if args.json:
        doc = report.to_json()
        doc["kind"] = kind
        print_json(doc)
    else:
        mode = "sizes and headers" if args.quick else "sizes and checksums"
        for c in checkpoints:
            status = "OK" if c.ok else f"FAILED ({len(c.problems)} bad)"
            print(f"{c.uri}: {status} — {c.files} files, {human_size(c.bytes)}, {mode}")
            for p in c.problems:
                print(f"  {p.kind}: {p.file}: {p.message}")
        if isinstance(report, RunReport):
            for p in run_problems:
                print(f"{report.uri}: {p.kind}: {p.file}: {p.message}")
            for n in report.notes:
                print(f"note: {n}")
            if not checkpoints:
                print(f"{report.uri}: no committed checkpoints")
            bad = sum(not c.ok for c in checkpoints)
            print(
                f"run {report.uri}: {len(checkpoints) - bad} of {len(checkpoints)} checkpoints OK"
                + ("" if not run_problems else f", {len(run_problems)} manifest problems")
            )
    if report.ok:
        return 0
    for c in checkpoints:
        for p in c.problems:
            print(f"dist-ckpt: bad file: {c.uri}/{p.file} ({p.kind})", file=sys.stderr)
    for p in run_problems:
        print(f"dist-ckpt: bad file: {report.uri}/{p.file} ({p.kind})", file=sys.stderr)
    return 1
