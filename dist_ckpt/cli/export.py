"""``dist-ckpt export CKPT OUT``: consolidate a checkpoint into plain safetensors for inference."""

from __future__ import annotations

import argparse
from typing import Any

from dist_ckpt.cli.common import checkpoint_at, human_size, print_json, progress_bar
from dist_ckpt.errors import ConfigError
from dist_ckpt.export import DTYPES, INDEX_FILE, CheckpointView, export_checkpoint, parse_size, select_tensors
from storage_backends import open_backend

EPILOG = f"""\
Works for any world size and codec: each full tensor is assembled from its chunks across the
rank files, written, and dropped (one tensor in memory at a time). The output is the Hugging
Face layout: model.safetensors, or model-0000i-of-0000N.safetensors plus {INDEX_FILE}
when --max-shard-size splits it. With one tracked model (and no --include-optimizer) tensor
names are those of model.state_dict(); otherwise the checkpoint's keys (model.…, optimizer.…).

examples:
  dist-ckpt export /data/runs/exp1/step_000001000 ./exported
  dist-ckpt export s3://bucket/runs/exp1/step_000001000 ./exported --dtype bf16 --max-shard-size 2GB
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="consolidate a checkpoint into plain safetensors",
                       description="Export a checkpoint's model tensors (optionally optimizer tensors too) as "
                       "consolidated safetensors files for inference.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder: a path or s3:// URI")
    p.add_argument("out", metavar="OUT", help="output directory (created if missing) or s3:// prefix")
    p.add_argument("--include-optimizer", action="store_true", help="export optimizer tensors as well (full keys)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point tensors to this dtype")
    p.add_argument("--max-shard-size", metavar="SIZE", help="split into files of at most SIZE (e.g. 5GB, 500MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace model files already in OUT")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    limit = parse_size(args.max_shard_size) if args.max_shard_size else None
    backend, prefix = checkpoint_at(args.checkpoint)
    view = CheckpointView(backend, prefix)
    try:
        out = open_backend(args.out)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    planned = select_tensors(view, args.include_optimizer)
    tensors = view.tensors
    total = sum(tensors[k].size.numel() * _itemsize(tensors[k].properties.dtype, args.dtype) for k in planned)
    with progress_bar(args, "export", total) as bar:
        result = export_checkpoint(view, out, include_optimizer=args.include_optimizer, dtype=args.dtype, names=planned,
                                   max_shard_size=limit, on_bytes=bar.update, overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print_json({"source": view.uri, "out": out.uri, "files": result.files, "tensors": result.tensors,
                    "total_size": result.total_size})  # fmt: skip
        return 0
    print(f"exported {result.tensors} tensors ({human_size(result.total_size)}) from {view.uri}")
    for f in result.files:
        print(f"  {out.uri}/{f}")
    return 0


def _itemsize(src: Any, dtype: str | None) -> int:
    import torch

    target = DTYPES[dtype] if dtype and src.is_floating_point else src
    return torch.empty((), dtype=target).element_size()
