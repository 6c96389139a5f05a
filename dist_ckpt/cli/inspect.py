"""``dist-ckpt inspect CKPT``: keys, shapes, dtypes, sizes, files, config, run id, versions."""

from __future__ import annotations

import argparse
import fnmatch
import math
from typing import Any

from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.cli.common import checkpoint_at, fmt_number, human_size, human_time, print_json, table
from dist_ckpt.config import flatten_config
from dist_ckpt.format.dtypes import BY_TORCH_NAME

EPILOG = """\
--keys takes a glob (model.*.weight) or, without wildcards, a key prefix (optimizer.state);
repeat it to show several groups.

examples:
  dist-ckpt inspect /data/runs/exp1/step_000001000
  dist-ckpt inspect s3://bucket/runs/exp1/step_000001000 --keys 'model.*' --json
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="show what one checkpoint holds",
        description="Show one checkpoint: keys with shapes, dtypes, stored and raw sizes; the "
        "per-rank file table; the config snapshot, tracker run id and versions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint folder: a path or s3:// URI (e.g. RUN/step_000001000)"
    )
    p.add_argument(
        "--keys", metavar="GLOB", action="append", help="only keys matching this glob or prefix (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def key_matcher(patterns: list[str] | None) -> Any:
    if not patterns:
        return lambda key: True

    def match(key: str) -> bool:
        for p in patterns:
            if any(c in p for c in "*?["):
                if fnmatch.fnmatchcase(key, p):
                    return True
            elif key.startswith(p):
                return True
        return False

    return match


def describe(view: CheckpointView, patterns: list[str] | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as one JSON-able document."""
    progress = view.progress()
    committed = view.committed_info()
    match = key_matcher(patterns)
    keys = []
    for fqn in view.meta.keys():
        if not match(fqn):
            continue
        refs = view.refs(fqn)
        stored = sum(r.stored_bytes for r in refs)
        md = view.meta.tensors.get(fqn)
        if md is not None:
            keys.append(
                {
                    "key": fqn,
                    "kind": "tensor",
                    "dtype": md.dtype,
                    "shape": list(md.size),
                    "chunks": len(md.chunks),
                    "files": sorted({r.file for r in refs}),
                    "stored_bytes": stored,
                    "raw_bytes": math.prod(md.size) * BY_TORCH_NAME[md.dtype].itemsize,
                }
            )
        else:
            keys.append(
                {
                    "key": fqn,
                    "kind": "value",
                    "dtype": None,
                    "shape": None,
                    "chunks": 1,
                    "files": [refs[0].file],
                    "stored_bytes": stored,
                    "raw_bytes": stored,
                }
            )
    files = [
        {"name": n, "rank": r.rank, "size": r.size, "checksum": r.checksum} for n, r in sorted(view.meta.files.items())
    ]
    return {
        "uri": view.uri,
        "step": progress.step if progress else committed.get("step"),
        "epoch": progress.epoch if progress else committed.get("epoch"),
        "metrics": dict(progress.metrics) if progress else committed.get("metrics", {}),
        "time": committed.get("time"),
        "world_size": view.meta.world_size,
        "codec": view.meta.codec,
        "versions": dict(view.meta.versions),
        "tracker_run_id": progress.tracker_run_id if progress else None,
        "config": progress.config if progress else None,
        "objects": dict(progress.objects) if progress else {},
        "best": dict(progress.best) if progress else {},
        "epochs_without_improvement": dict(progress.since_improvement) if progress else {},
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "keys": keys,
        "key_count": len(view.meta.keys()),
    }


def run(args: argparse.Namespace) -> int:
    backend, prefix = checkpoint_at(args.checkpoint)
    doc = describe(CheckpointView(backend, prefix), args.keys)
    if args.json:
        print_json(doc)
        return 0
    print(f"checkpoint {doc['uri']}")
    epoch = "-" if doc["epoch"] is None else doc["epoch"]
    step = "-" if doc["step"] is None else doc["step"]
    print(
        f"  step {step}  epoch {epoch}  saved {human_time(doc['time'])}  world size "
        f"{doc['world_size']}  codec {doc['codec']}"
    )
    if doc["metrics"]:
        print("  metrics: " + " ".join(f"{k}={fmt_number(v)}" for k, v in sorted(doc["metrics"].items())))
    if doc["best"]:
        print("  best: " + " ".join(f"{k}={fmt_number(v)}" for k, v in sorted(doc["best"].items())))
    print(f"  tracker run id: {doc['tracker_run_id'] or '-'}")
    print("  versions: " + (", ".join(f"{k} {v}" for k, v in sorted(doc["versions"].items())) or "-"))
    if doc["objects"]:
        print("  objects: " + ", ".join(f"{n} ({k})" for n, k in doc["objects"].items()))
    if doc["config"] is None:
        print("  config: -")
    else:
        print("  config:")
        for k, v in sorted(flatten_config(doc["config"]).items()):
            print(f"    {k}: {v!r}")
    print(f"\nfiles ({len(doc['files'])}, {human_size(doc['total_bytes'])}):")
    rows = [(f["name"], f["rank"], human_size(f["size"]), f["checksum"]) for f in doc["files"]]
    print(_indent(table(("FILE", "RANK", "SIZE", "CHECKSUM"), rows, right=(1, 2))))
    shown = f"{len(doc['keys'])} of {doc['key_count']}" if args.keys else str(doc["key_count"])
    print(f"\nkeys ({shown}):")
    rows = [
        (
            k["key"],
            k["kind"],
            k["dtype"] or "-",
            "-" if k["shape"] is None else "x".join(map(str, k["shape"])) or "()",
            k["chunks"],
            human_size(k["stored_bytes"]),
            human_size(k["raw_bytes"]),
        )
        for k in doc["keys"]
    ]
    if rows:
        print(_indent(table(("KEY", "KIND", "DTYPE", "SHAPE", "CHUNKS", "STORED", "RAW"), rows, right=(4, 5, 6))))
    stored, raw = sum(k["stored_bytes"] for k in doc["keys"]), sum(k["raw_bytes"] for k in doc["keys"])
    print(
        f"  total: stored {human_size(stored)}, raw {human_size(raw)}" + (f" (ratio {stored / raw:.3f})" if raw else "")
    )
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
