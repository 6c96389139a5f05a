"""``dist-ckpt export CKPT OUT`` / ``export RUN --which W OUT``: consolidate a checkpoint into
plain safetensors for inference (``--config FILE`` adds a config.json for ``from_pretrained``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from dist_ckpt.cli.common import human_size, print_json, progress_bar
from dist_ckpt.errors import ConfigError
from dist_ckpt.export_layout import CONFIG_FILE, DTYPE_NAMES, INDEX_FILE, parse_size
from dist_ckpt.format.dtypes import dtype_from_name
from dist_ckpt.format.metadata_json import TensorRecord
from storage_backends import Backend

EPILOG = f"""\
Works for any world size and codec: each full tensor is assembled from its chunks across the
rank files, written, and dropped (one tensor in memory at a time). The output is the Hugging
Face layout: model.safetensors, or model-0000i-of-0000N.safetensors plus {INDEX_FILE}
when --max-shard-size splits it. With one tracked model (and no --include-optimizer) tensor
names are those of model.state_dict(); otherwise the checkpoint's keys (model.…, optimizer.…).
Given a run root, --which names the checkpoint as restore(which=...) does: last,
best:<metric>, a step number or step_000001000. --config FILE (a JSON object, e.g. the
model's config.json) is written as {CONFIG_FILE} beside the weights, so
AutoModel.from_pretrained(OUT) finds both.

examples:
  dist-ckpt export /data/runs/exp1/step_000001000 ./exported
  dist-ckpt export /data/runs/exp1 --which best:val_loss ./exported --config model_config.json
  dist-ckpt export s3://bucket/runs/exp1/step_000001000 ./exported --dtype bf16 --max-shard-size 2GB
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="consolidate a checkpoint into plain safetensors",
        description="Export a checkpoint's model tensors (optionally optimizer tensors too) as "
        "consolidated safetensors files for inference.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", metavar="CKPT|RUN", help="checkpoint folder, or a run root with --which: a path or s3:// URI"
    )
    p.add_argument("out", metavar="OUT", help="output directory (created if missing) or s3:// prefix")
    p.add_argument("--which", metavar="W", help="with a run root: last, best:<metric>, a step number or step_NNNNNNNNN")
    p.add_argument("--config", metavar="FILE", help=f"a JSON file to write as {CONFIG_FILE} beside the weights")
    p.add_argument("--include-optimizer", action="store_true", help="export optimizer tensors as well (full keys)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast floating-point tensors to this dtype")
    p.add_argument("--max-shard-size", metavar="SIZE", help="split into files of at most SIZE (e.g. 5GB, 500MiB)")
    p.add_argument("--overwrite", action="store_true", help=f"replace model files (and {CONFIG_FILE}) already in OUT")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def read_config_file(path: str) -> bytes:
    """The bytes to write as config.json: ``path`` must hold a JSON object (checked before any
    tensor is read, so a typo costs nothing)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--config {path}: not UTF-8 text; expected a JSON object such as a model's config.json"
        ) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--config {path}: not valid JSON ({e}); expected a JSON object such as a model's config.json"
        ) from e
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a JSON object, found {type(doc).__name__}")
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def source(args: argparse.Namespace) -> tuple[Backend, str]:
    """Backend and folder name of the checkpoint to export: CKPT itself, or RUN's ``--which``."""
    from dist_ckpt.checkpoint_view import locate
    from dist_ckpt.cli.common import run_at

    if args.which is None:
        kind, backend, prefix = locate(args.checkpoint)
        if kind == "run":
            raise ConfigError(
                f"{backend.uri} is a run root, not one checkpoint: choose one with --which (last, best:<metric>, "
                f"a step number), or pass a checkpoint folder; `dist-ckpt list {args.checkpoint}` shows them"
            )
        return backend, prefix
    from dist_ckpt.resume import resolve_which
    from dist_ckpt.run_store import RunStore
    from storage_backends import open_backend

    backend = run_at(args.checkpoint)
    store = RunStore(backend)
    manifest = store.reconciled_manifest({}, write=False)  # best modes come from the run's own manifest
    target = resolve_which(manifest, store, args.which, {})
    if target is None:
        raise ConfigError(f"{backend.uri}: no committed checkpoint to export (`dist-ckpt list {args.checkpoint}`)")
    root, prefix = target
    return (backend if root == backend.uri else open_backend(root)), prefix


def run(args: argparse.Namespace) -> int:
    from dist_ckpt.checkpoint_view import CheckpointView
    from dist_ckpt.export import export_checkpoint, select_tensors
    from storage_backends import open_backend

    limit = parse_size(args.max_shard_size) if args.max_shard_size else None
    config = read_config_file(args.config) if args.config else None
    backend, prefix = source(args)
    view = CheckpointView(backend, prefix)
    try:
        out = open_backend(args.out)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config is not None and not args.overwrite and out.exists(CONFIG_FILE):
        raise ConfigError(
            f"{out.uri} already holds {CONFIG_FILE}; export into an empty directory (or pass --overwrite)"
        )
    planned = select_tensors(view, args.include_optimizer)
    total = sum(_nbytes(view.tensors[k], args.dtype) for k in planned)
    with progress_bar(args, "export", total) as bar:
        result = export_checkpoint(
            view,
            out,
            include_optimizer=args.include_optimizer,
            dtype=args.dtype,
            names=planned,
            max_shard_size=limit,
            on_bytes=bar.update,
            overwrite=args.overwrite,
        )
    files = list(result.files)
    if config is not None:
        out.write_bytes(CONFIG_FILE, config)  # after the weights: a failed export leaves no lone config
        files.append(CONFIG_FILE)
    if args.json:
        print_json(
            {
                "source": view.uri,
                "out": out.uri,
                "files": files,
                "tensors": result.tensors,
                "total_size": result.total_size,
            }
        )
        return 0
    print(f"exported {result.tensors} tensors ({human_size(result.total_size)}) from {view.uri}")
    for f in files:
        print(f"  {out.uri}/{f}")
    return 0


def _nbytes(record: TensorRecord, dtype: str | None) -> int:
    import torch

    from dist_ckpt.export import DTYPES

    src = dtype_from_name(record.dtype, "export")
    target = DTYPES[dtype] if dtype and src.is_floating_point else src
    return math.prod(record.size) * torch.empty((), dtype=target).element_size()
