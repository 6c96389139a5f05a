"""``dist-ckpt import SRC DST_RUN [--step N]``: a DCP folder, a ``torch.save`` file or a Hugging
Face folder becomes a committed checkpoint of a run (``dist_ckpt.import_checkpoint``). Torch is
imported only when the command runs, so ``dist-ckpt --help`` stays fast."""

from __future__ import annotations

import argparse
from typing import Any

from dist_ckpt.cli.common import human_size, print_json
from dist_ckpt.cli.write_safety import FLAG, add_flag

EPILOG = """\
SRC (a local path) is one of:
  a DCP checkpoint folder   .metadata + *.distcp (torch.distributed.checkpoint's FileSystemWriter,
                            any world size: FSDP/DTensor shards are assembled). Its top-level names
                            stay ({"model": ..., "optim": ...} -> track(model=..., optim=...));
                            --name NAME puts a bare dcp.save(model.state_dict()) under NAME;
                            --key app takes {"app": AppState(...)}'s app.* keys as *
  a torch.save file         .pt/.pth/.bin/.ckpt/.tar (or --format torch): a model state dict,
                            or --key ENTRY of a dict that holds one; imported under --name (model)
  a Hugging Face folder     config.json + model.safetensors, or model.safetensors.index.json and
                            its shards; imported under --name (model)
  a .safetensors file       likewise
Nothing is unpickled freely: DCP's .metadata through an unpickler that admits only DCP's
metadata classes and builtins (anything else is refused by name, never run), torch payloads
through torch.load(weights_only=True). The source is read and checked whole before anything is
written; DST_RUN's writer lock is taken (exit 6 while a training job holds it) and the step is
committed like any save: restore()/load_weights() read it, at any world size.

examples:
  dist-ckpt import /ckpts/dcp/step_1000 /data/runs/exp1 --step 1000
  dist-ckpt import model.pt s3://bucket/runs/exp1 --key state_dict
  dist-ckpt import ./hf-model /data/runs/finetune
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import",
        parents=[common],
        help="import a DCP, torch.save or Hugging Face checkpoint",
        description="Turn a checkpoint written by other tools into a committed dist_ckpt checkpoint of a run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="DCP folder, torch.save file, Hugging Face folder or .safetensors file")
    p.add_argument("dst", metavar="DST_RUN", help="run root to commit it into: a path or s3:// URI")
    p.add_argument("--step", type=int, default=0, metavar="N", help="the step of the new checkpoint (default 0)")
    p.add_argument(
        "--format", choices=("dcp", "torch", "hf", "safetensors"), help="the source format (default: detected)"
    )
    p.add_argument(
        "--name",
        metavar="NAME",
        help="the tracked name the weights go under (default: model; a DCP "
        "folder keeps its own top-level names unless given)",
    )
    p.add_argument(
        "--key",
        metavar="ENTRY",
        help="torch.save: the entry holding the state dict (dotted: a.b); "
        "DCP: the key prefix to take and strip (app: app.model.* -> model.*)",
    )
    p.add_argument("--compression", choices=("none", "zstd"), default="none", help="codec of the new checkpoint")
    p.add_argument("--json", action="store_true", help="print what was imported as JSON")
    add_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dist_ckpt.importers import import_checkpoint

    result = import_checkpoint(
        args.src,
        args.dst,
        step=args.step,
        format=args.format,
        name=args.name,
        key=args.key,
        compression=args.compression,
        unsafe_single_writer=bool(getattr(args, "unsafe_single_writer", False)),
    )
    if args.json:
        print_json(result.__dict__)
        return 0
    objects = ", ".join(f"{n} ({k})" for n, k in result.objects.items())
    print(
        f"imported {result.format} checkpoint {result.source} -> {result.uri}: {result.tensors} tensors "
        f"({human_size(result.tensor_bytes)}), {result.values} values; objects {objects}"
    )
    return 0


__all__ = ["register", "run", "FLAG"]
