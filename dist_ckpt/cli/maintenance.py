"""``dist-ckpt prune`` (retention, as the manager applies it) and ``dist-ckpt gc`` (leftovers)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dist_ckpt import manifest as mf
from dist_ckpt.cli.common import BREAK_LOCK_HELP, print_json, run_at, run_locked
from dist_ckpt.cli.write_safety import add_flag, require_safe_writes
from dist_ckpt.errors import CheckpointError, ConfigError
from dist_ckpt.run_store import RunStore, step_prefix

PRUNE_EPILOG = """\
The same rules as the manager's keep_last / keep_every_n_steps: the newest N checkpoints, every
checkpoint a pointer names (last, best:<metric>) and every multiple of K are kept. manifest.json
is updated (compare-and-swap) before anything is deleted, so readers never see a pointer to a
deleted checkpoint. It takes the run's writer lock first: while a training job's manager has
the run open (its lock heart-beating), it refuses (exit 6), naming the job and its last
heartbeat; --break-lock overrides that (dangerous: only once that job is gone). Without a
readable manifest the tracked metrics are unknown: name them with --best METRIC=min|max so
their best checkpoints are kept.

examples:
  dist-ckpt prune /data/runs/exp1 --keep-last 3 --dry-run
  dist-ckpt prune s3://bucket/runs/exp1 --keep-last 5 --keep-every 10000
"""

GC_EPILOG = """\
Removes what interrupted saves leave behind: step_X.tmp-* staging folders, step folders without
a COMMITTED marker and unfinished multipart uploads. Committed checkpoints are never touched.
Like prune, it takes the run's writer lock first, so it refuses (exit 6) while a training
job's manager has the run open — a live job's in-flight save looks exactly like a leftover.
--break-lock overrides that (dangerous: only once that job is gone).

examples:
  dist-ckpt gc /data/runs/exp1 --dry-run
  dist-ckpt gc s3://bucket/runs/exp1
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prune",
        parents=[common],
        help="delete old checkpoints by the manager's retention rules",
        description="Apply retention to a run: keep the newest N checkpoints and every pointed-to one.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run root: a directory or s3://bucket/prefix")
    p.add_argument("--keep-last", metavar="N", type=int, required=True, help="keep the newest N checkpoints (N >= 1)")
    p.add_argument(
        "--keep-every", metavar="K", type=int, help="also keep every checkpoint whose step is a multiple of K"
    )
    p.add_argument(
        "--best",
        metavar="METRIC=MODE",
        action="append",
        default=[],
        help="a tracked metric and its mode (min|max), added to those in manifest.json (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_flag(p)
    p.set_defaults(func=run_prune)

    g = sub.add_parser(
        "gc",
        parents=[common],
        help="remove leftovers of interrupted saves",
        description="Remove temp folders, uncommitted steps and unfinished uploads of a run.",
        epilog=GC_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("run", metavar="RUN", help="run root: a directory or s3://bucket/prefix")
    g.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    g.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    g.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_flag(g)
    g.set_defaults(func=run_gc)


def _parse_best(items: list[str]) -> dict[str, str]:
    modes = {}
    for item in items:
        metric, _, mode = item.partition("=")
        if not metric or mode not in ("min", "max"):
            raise ConfigError(f"--best {item!r}: expected METRIC=min or METRIC=max")
        modes[metric] = mode
    return modes


def _retained(store: RunStore, current: mf.Manifest | None, extra: dict[str, str]) -> mf.Manifest:
    """The manifest the COMMITTED markers give, keeping the stored one's modes, run id and hash."""
    base = current or mf.Manifest()
    return mf.rebuild(store.committed_entries(), {**base.best_modes, **extra}, base.tracker_run_id, base.config_hash)


def run_prune(args: argparse.Namespace) -> int:
    if args.keep_last < 1:
        raise ConfigError(f"--keep-last {args.keep_last}: must be at least 1 (the newest checkpoint is always kept)")
    if args.keep_every is not None and args.keep_every < 1:
        raise ConfigError(f"--keep-every {args.keep_every}: must be at least 1")
    extra = _parse_best(args.best)
    backend = run_at(args.run)
    if not args.dry_run:
        require_safe_writes(args, backend)
    store = RunStore(backend)
    current, version = store.read_manifest()
    if current is None and not extra and any(e.metrics for e in store.committed_entries()):
        what = "not a valid manifest" if version is not None else "missing"
        raise ConfigError(
            f"{backend.uri}/manifest.json is {what}, so which metrics have best:<metric> pointers is unknown; "
            "pass --best METRIC=min|max for each tracked metric (their best checkpoints are then kept)"
        )
    failed: list[int] = []
    if args.dry_run:
        full = _retained(store, current, extra)
        drops = mf.retention_drops(full, args.keep_last, args.keep_every)
        result = mf.without_steps(full, drops)
    else:

        def report(step: int, e: CheckpointError) -> None:
            print(f"dist-ckpt: error: could not delete step {step}: {e}", file=sys.stderr)

        with run_locked(backend, args.break_lock) as lock:
            kept = store.apply_retention(
                lambda cur: _retained(store, cur, extra),
                args.keep_last,
                args.keep_every,
                fence=lock.fence,
                on_failure=report,
            )
            result, drops, failed = kept.manifest, list(kept.drops), list(kept.failed)
    names: dict[int, list[str]] = {}
    for name, step in sorted(result.pointers.items()):
        names.setdefault(step, []).append(name)
    if args.json:
        deleted = [] if args.dry_run else [s for s in drops if s not in failed]
        print_json(
            {
                "run": backend.uri,
                "dry_run": args.dry_run,
                "deleted": deleted,
                "would_delete": drops if args.dry_run else [],
                "failed": failed,
                "kept": result.steps(),
                "pointers": dict(result.pointers),
            }
        )
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for step in drops:
            if step not in failed:
                print(f"{verb} {backend.uri}/{step_prefix(step)}")
        kept = ", ".join(f"{s}" + (f" ({', '.join(names[s])})" if s in names else "") for s in result.steps())
        print(f"{'would keep' if args.dry_run else 'kept'} {len(result.steps())} checkpoints: {kept or 'none'}")
        if not drops:
            print("nothing to delete")
    return 4 if failed else 0


def run_gc(args: argparse.Namespace) -> int:
    backend = run_at(args.run)
    if not args.dry_run:
        require_safe_writes(args, backend)
    if args.dry_run:
        found = RunStore(backend).collect_garbage(dry_run=True)
    else:
        with run_locked(backend, args.break_lock):  # a live job's in-flight save would look like a leftover
            found = RunStore(backend).collect_garbage()
    if args.json:
        print_json(
            {
                "run": backend.uri,
                "dry_run": args.dry_run,
                "temp_dirs": list(found.temp_dirs),
                "uncommitted_steps": list(found.uncommitted_steps),
                "unfinished_uploads": list(found.unfinished_uploads),
            }
        )
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for folder in found.temp_dirs:
        print(f"{verb} temp folder {backend.uri}/{folder}/")
    for folder in found.uncommitted_steps:
        print(f"{verb} uncommitted step {backend.uri}/{folder}/")
    for key in found.unfinished_uploads:
        print(f"{verb} unfinished upload {backend.uri}/{key}")
    if not (found.temp_dirs or found.uncommitted_steps or found.unfinished_uploads):
        print(f"{backend.uri}: no leftovers")
    return 0
