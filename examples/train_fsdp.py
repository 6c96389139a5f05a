"""FSDP2 (fully_shard) training on CPU with dist_ckpt: sharded save, exact resume, any world size.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --ckpt /tmp/run1 --steps 40
    torchrun --nproc-per-node 2 examples/train_fsdp.py --ckpt /tmp/run2 --resume /tmp/run1/step_000000039
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import common  # noqa: E402
from dist_ckpt import CheckpointManager  # noqa: E402


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(__doc__ or "", argv)
    rank, world = common.init_distributed()
    torch.manual_seed(args.seed)
    model = build_model()
    if dist.is_initialized():
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    loader, sampler = common.make_loader(args.seed, args.batch_size, rank, world)

    mgr = CheckpointManager(
        args.ckpt, keep_last=args.keep_last, save_every_n_steps=args.save_every, best={"loss": "min"},
        compression=args.compression, config=vars(args) | {"crash_at_step": None}, total_steps=args.steps,
    )  # fmt: skip
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    start = 0
    if args.fresh_start_from:
        mgr.load_weights(model, which=args.fresh_start_from)
    elif (which := common.resume_which(args)) is not None and (info := mgr.restore(state, which)) is not None:
        start = info.step + 1
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
        mgr.save(step, state, metrics={"loss": value.item()}, force=step == args.steps - 1)
        common.crash_if_asked(args, step, rank)
    mgr.close()
    common.write_full_state(args.final_out, model, {"optimizer": opt})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
