"""``dist-ckpt list RUN``: the committed checkpoints of a run and the pointers naming them."""

from __future__ import annotations

import argparse
from typing import Any

from dist_ckpt import manifest as mf
from dist_ckpt.cli.common import fmt_number, human_size, human_time, note, print_json, run_at, table
from dist_ckpt.run_store import RunStore, step_prefix

EPILOG = """\
The truth is the set of COMMITTED markers; pointers (last, best:<metric>) follow from them and
the metric modes recorded in manifest.json.

examples:
  dist-ckpt list /data/runs/exp1
  dist-ckpt list s3://bucket/runs/exp1 --json | jq '.pointers'
  dist-ckpt list s3://bucket/runs/exp1 --local-root /local/nvme/exp1   # tiered: a TIERS column
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "list",
        parents=[common],
        help="list a run's committed checkpoints",
        description="List the committed checkpoints of a run: step, epoch, time, size, "
        "world size, codec, metrics and the pointers (last, best:<metric>) naming each.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run root: a directory or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--local-root",
        default=None,
        metavar="DIR",
        help="the run's local tier on this node (CheckpointManager(local_root=...)): also list its "
        "checkpoints, and in which tiers (local, root) each is",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    backend = run_at(args.run)
    store = RunStore(backend)
    entries = store.committed_entries()
    manifest, version = store.read_manifest()
    if manifest is None and entries:
        what = "not a valid manifest" if version is not None else "missing"
        note(
            args,
            f"note: {backend.uri}/manifest.json is {what}; best:<metric> pointers are unknown until the "
            "manager rebuilds it",
        )
    elif manifest is not None and set(manifest.steps()) != {e.step for e in entries}:
        note(
            args,
            f"note: {backend.uri}/manifest.json is stale; showing the committed checkpoints (the manager "
            "reconciles it at its next start)",
        )
    modes = dict(manifest.best_modes) if manifest is not None else {}
    tiers: dict[int, tuple[str, ...]] = {}
    if args.local_root is not None:
        from dist_ckpt.tiers.policy import tiered_listing

        entries, tiers = tiered_listing(entries, RunStore(run_at(args.local_root)).committed_entries())
    pointers = mf.compute_pointers(entries, modes)
    names: dict[int, list[str]] = {}
    for name, step in sorted(pointers.items()):
        names.setdefault(step, []).append(name)
    if args.json:
        print_json(
            {
                "run": backend.uri,
                "pointers": pointers,
                "best_modes": modes,
                "tracker_run_id": manifest.tracker_run_id if manifest is not None else None,
                "checkpoints": [
                    {
                        **e.to_json(),
                        "logical_size": e.logical_size or e.size,
                        "metrics": dict(e.metrics),
                        "pointers": names.get(e.step, []),
                        "uri": f"{backend.uri}/{step_prefix(e.step)}",
                        **({"tiers": list(tiers[e.step])} if tiers else {}),
                    }
                    for e in entries
                ],
            }
        )
        return 0
    if not entries:
        print(f"{backend.uri}: no committed checkpoints")
        return 0
    rows = [
        (
            e.step,
            "-" if e.epoch is None else e.epoch,
            human_time(e.time),
            human_size(e.size),
            e.world_size,
            e.codec,
            " ".join(f"{k}={fmt_number(v)}" for k, v in sorted(e.metrics.items())) or "-",
            ", ".join(names.get(e.step, [])),
            *((",".join(tiers[e.step]),) if tiers else ()),
        )
        for e in entries
    ]
    print(f"run {backend.uri}: {len(entries)} committed checkpoints, {human_size(sum(e.size for e in entries))}")
    tier_header = ("TIERS",) if tiers else ()
    if any(e.logical_size not in (0, e.size) for e in entries):  # incremental: own bytes, and all it reads
        rows = [(*r[:4], human_size(e.logical_size or e.size), *r[4:]) for r, e in zip(rows, entries)]
        print(
            table(
                ("STEP", "EPOCH", "TIME", "OWN", "LOGICAL", "WORLD", "CODEC", "METRICS", "POINTERS", *tier_header),
                rows,
                right=(0, 1, 3, 4, 5),
            )
        )
        return 0
    print(
        table(
            ("STEP", "EPOCH", "TIME", "SIZE", "WORLD", "CODEC", "METRICS", "POINTERS", *tier_header),
            rows,
            right=(0, 1, 3, 4),
        )
    )
    return 0
