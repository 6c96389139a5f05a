"""A GAN on CPU: generator, discriminator, two optimizers, two schedulers — always saved and
restored together, from the same step, with a best checkpoint by generator loss.

    torchrun --nproc-per-node 2 examples/train_gan.py --ckpt /tmp/gan --steps 40
    python examples/train_gan.py --ckpt /tmp/gan2 --resume /tmp/gan/step_000000039  # branch a new run from a checkpoint
    python examples/train_gan.py --ckpt /tmp/gan3 --init-from /tmp/gan/step_000000039  # its weights, a new run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402

NOISE = 8


def main(argv: list[str] | None = None) -> tuple[nn.Module, nn.Module]:
    args = common.parse_args(__doc__ or "", argv)
    rank, world = common.init_distributed()
    torch.manual_seed(args.seed)
    gen = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 16))
    disc = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(32, 1))
    if dist.is_initialized():
        gen, disc = DDP(gen), DDP(disc)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.99)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.99)
    loader, sampler = common.make_loader(args.seed, args.batch_size, rank, world)
    bce = nn.BCEWithLogitsLoss()

    mgr = CheckpointManager(
        args.ckpt,
        keep_last=args.keep_last,
        save_every_n_steps=args.save_every,
        best={"g_loss": "min"},
        compression=args.compression,
        config=common.run_config(args, crash_at_step=None),
    )
    state = mgr.track(generator=gen, discriminator=disc, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d)
    info = mgr.start(state, args)  # --resume / --init-from (both models); exits 2 on an invalid combination
    start = info.step + 1 if info else 0
    common.write_full_state(args.loaded_out, gen, {"opt_g": opt_g})
    for step, (real, _) in common.batches_from(loader, sampler, start):
        if step >= args.steps:
            break
        fake = gen(torch.randn(real.shape[0], NOISE))
        d_loss = bce(disc(real), torch.ones(real.shape[0], 1)) + bce(disc(fake.detach()), torch.zeros(real.shape[0], 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(disc(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        sched_g.step()
        sched_d.step()
        value = g_loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= world
        common.record_loss(args, rank, step, value.item())
        mgr.save(step, state, metrics={"g_loss": value.item(), "d_loss": d_loss.item()}, force=step == args.steps - 1)
        common.crash_if_asked(args, step, rank)
    mgr.close()
    common.write_full_state(args.final_out, gen, {"opt_g": opt_g})
    if dist.is_initialized():
        dist.destroy_process_group()
    return gen, disc  # the caller holds the DDP modules until exit_without_finalization


if __name__ == "__main__":
    models = main()  # held until the exit: freeing a DDP module at exit can deadlock (see below)
    common.exit_without_finalization()  # see its docstring: a PyTorch gloo/DDP teardown race
