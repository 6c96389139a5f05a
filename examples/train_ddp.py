"""DDP training on CPU with dist_ckpt: resumes exactly where a killed run stopped.

    torchrun --nproc-per-node 2 examples/train_ddp.py --ckpt /tmp/run1 --steps 40
    torchrun --nproc-per-node 2 examples/train_ddp.py --ckpt /tmp/run2 --init-from /tmp/run1/step_000000039
    python examples/train_ddp.py --ckpt /tmp/run1 --list-checkpoints
    torchrun --nproc-per-node 2 examples/train_ddp.py --ckpt /tmp/run3 --async --save-on-sigterm

With ``--save-on-sigterm``, SIGTERM to any rank (or to torchrun) makes ``mgr.should_stop()``
True on every rank: the loop saves the current step and exits with 143; ``--resume auto``
continues from that step.

DDP runs with its defaults; ``--bucket-cap-mb MB``, ``--gradient-as-bucket-view``,
``--static-graph`` and ``--compile`` (``torch.compile`` of the DDP model) change them. A resume
is bit-exact at any of them: the checkpoint carries DDP's gradient-bucket layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def ddp_options(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """DDP's own flags (see the module docstring), split off before the shared ones are parsed."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--bucket-cap-mb", type=float, default=None)
    p.add_argument("--gradient-as-bucket-view", action="store_true")
    p.add_argument("--static-graph", action="store_true")
    p.add_argument("--compile", action="store_true")
    return p.parse_known_args(sys.argv[1:] if argv is None else argv)


def wrap_ddp(model: nn.Module, opts: argparse.Namespace | None = None) -> nn.Module:
    # DDP's defaults: dist_ckpt saves the gradient-bucket layout DDP settles on after its first
    # backward and restores it, so a resumed run all-reduces in the same order (bit-exact).
    opts = opts or ddp_options([])[0]
    ddp = DDP(
        model,
        bucket_cap_mb=opts.bucket_cap_mb,
        gradient_as_bucket_view=opts.gradient_as_bucket_view,
        static_graph=opts.static_graph,
    )
    return torch.compile(ddp) if opts.compile else ddp


def main(
    argv: list[str] | None = None, *, wrap: Callable[[nn.Module], nn.Module] | None = None, doc: str | None = None
) -> nn.Module:
    """The training loop; ``wrap`` makes the model distributed (DDP by default, FSDP2 in train_fsdp.py).
    Returns the (wrapped) model: the caller holds it until :func:`common.exit_without_finalization`."""
    opts, argv = ddp_options(argv)
    wrap = wrap or (lambda model: wrap_ddp(model, opts))
    args = common.parse_args(doc or __doc__ or "", argv)
    rank, world = common.init_distributed()
    torch.manual_seed(args.seed)
    model = build_model()
    if dist.is_initialized():
        model = wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    loader, sampler = common.make_loader(args.seed, args.batch_size, rank, world)

    mgr = CheckpointManager(
        args.ckpt,
        keep_last=args.keep_last,
        save_every_n_steps=args.save_every,
        best={"loss": "min"},
        compression=args.compression,
        config=common.run_config(args, crash_at_step=None, step_delay=None, local_root=None),
        total_steps=args.steps,
        async_save="overlap" if args.overlap else args.async_save,
        async_mode=args.async_mode,
        save_on_sigterm=args.save_on_sigterm,
        local_root=args.local_root,
        persist_every_n_saves=args.persist_every,
    )
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    info = mgr.start(state, args)  # --resume / --init-from; exits 2 on an invalid combination
    start = info.step + 1 if info else 0
    common.write_full_state(args.loaded_out, model, {"optimizer": opt})
    for step, (x, y) in common.batches_from(loader, sampler, start):
        if step >= args.steps:
            break
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= world
        common.record_loss(args, rank, step, value.item())
        stop = mgr.should_stop()  # with --save-on-sigterm: True on every rank once any rank got SIGTERM
        mgr.save(step, state, metrics={"loss": value.item()}, force=stop or step == args.steps - 1)
        common.crash_if_asked(args, step, rank)
        if stop:
            mgr.exit_after_preemption()  # waits for that save, closes, exits with 143
        if args.step_delay:
            time.sleep(args.step_delay)
    mgr.close()
    common.write_full_state(args.final_out, model, {"optimizer": opt})
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    model = main()  # held until the exit: freeing a DDP module at exit can deadlock (see below)
    common.exit_without_finalization()  # see its docstring: a PyTorch gloo/DDP teardown race
