"""Shared scaffolding of the example trainers: arguments, data, process group, outputs.

The examples are real training loops (CPU, gloo) that the demo and the tests run under
``torchrun``. Exactness needs two things besides dist_ckpt restoring every RNG: the data order
must be a function of (epoch, position) — a seeded ``DistributedSampler`` — and nothing may
draw from the global RNG outside the training step (the DataLoader gets its own generator).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dist_ckpt import add_checkpoint_args
from dist_ckpt.resume_flags import CHECKPOINT_ARGS


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)  # --ckpt, --resume, --init-from, --list-checkpoints; mgr.start(state, args) applies them
    p.add_argument("--fresh-start-from", dest="init_from", help=argparse.SUPPRESS)  # the old name of --init-from
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="none", choices=["none", "zstd"])
    p.add_argument(
        "--crash-at-step", type=int, default=None, help="rank 0 SIGKILLs itself after this step (tests, demo)"
    )
    p.add_argument("--losses-out", default=None, help="write per-step losses (JSON lines, rank 0)")
    p.add_argument(
        "--final-out", default=None, help="write final full parameters and optimizer state (safetensors, rank 0)"
    )
    p.add_argument("--loaded-out", default=None, help="write the state right after resuming (safetensors, rank 0)")
    p.add_argument(
        "--async",
        dest="async_save",
        action="store_true",
        help="save in the background (async_save=True: overlapped staging where safe)",
    )
    p.add_argument("--overlap", action="store_true", help="async save with overlapped staging (async_save='overlap')")
    p.add_argument("--async-mode", default="thread", choices=["thread", "process"], help="background worker of --async")
    p.add_argument("--save-on-sigterm", action="store_true", help="on SIGTERM: save the current step and exit with 143")
    p.add_argument(
        "--step-delay", type=float, default=0.0, help="sleep this long after each step (tests: time to signal)"
    )
    p.add_argument(
        "--local-root", default=None, help="node-local tier: saves commit there, promoted to --ckpt in the background"
    )
    p.add_argument(
        "--persist-every", type=int, default=1, help="with --local-root: promote every N-th save (and bests)"
    )
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int]:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(
    seed: int, batch_size: int, rank: int, world: int, n: int = 256, features: int = 16
) -> tuple[DataLoader, DistributedSampler]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, 1, generator=g)).tanh() + 0.1 * torch.randn(n, 1, generator=g)
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler, generator=torch.Generator())
    return loader, sampler


def batches_from(loader: DataLoader, sampler: DistributedSampler, start_step: int) -> Iterator[tuple[int, Any]]:
    """Yield (step, batch) from ``start_step`` on; the data order depends only on the step."""
    per_epoch = len(loader)
    step = start_step
    while True:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            yield step, batch
            step += 1


def crash_if_asked(args: argparse.Namespace, step: int, rank: int) -> None:
    if args.crash_at_step is not None and step == args.crash_at_step and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def record_loss(args: argparse.Namespace, rank: int, step: int, loss: float) -> None:
    if args.losses_out and rank == 0:
        with open(args.losses_out, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.hex() if isinstance(loss, float) else loss}) + "\n")


def write_full_state(path: str | None, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Full (unsharded) parameters and optimizer state to one safetensors file (rank 0).
    Every rank must call it (gathering FSDP shards is a collective)."""
    if not path:
        return
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    tensors: dict[str, torch.Tensor] = {}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for name, opt in optimizers.items():
        msd, osd = get_state_dict(model, opt, options=opts)
        tensors.update({f"model.{k}": v for k, v in msd.items()})
        for fqn, st in osd.get("state", {}).items():  # full state dicts land on rank 0 only
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{name}.{fqn}.{k}"] = v.reshape(-1) if v.dim() == 0 else v
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path)


def run_config(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The run's config for the manager: the arguments, less the checkpoint flags (they say how
    this launch starts, and differ between launches of one run)."""
    return {k: v for k, v in vars(args).items() if k not in CHECKPOINT_ARGS} | overrides


def exit_without_finalization() -> None:
    """End a finished DDP job without Python's interpreter finalization.

    Everything is written, committed and the process group destroyed by now. What is left is
    a PyTorch teardown race (seen under load, torch 2.13, gloo): the DDP module's ``Reducer``,
    freed at finalization with the GIL held, drops the last reference to its
    ``ProcessGroupGloo``, whose destructor joins a worker thread that is itself waiting for the
    GIL to free the Python-owned tensors of the last broadcast — a deadlock at exit, or
    ``std::terminate`` ("terminate called without an active exception") later in finalization.
    The same destructor runs when the last reference to the DDP module goes, e.g. when ``main()``
    returns with the module in a local: callers keep it referenced until this call.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
