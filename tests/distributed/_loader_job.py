"""A user-style training script, as a new user writes it: a plain DataLoader (no generator=),
a DistributedSampler with set_epoch (or shuffle=True in one process), dropout, a torch.rand
in the step, DDP under torchrun, and the loop

    for epoch in range(resume.epoch, E): sampler.set_epoch(epoch); for batch in loader: ...

It records, per rank and step, the loss, the sample ids and worker seeds of the batch, the
random number drawn in the step and a hash of the global RNG state at the start of the step.
With --crash-at-step rank 0 SIGKILLs itself once (a marker file beside the run root makes the
same command resume the next time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from dist_ckpt import CheckpointManager


class Samples(Dataset):
    """Sample i: its id, features, target, and the seed of the worker that loaded it."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True).tanh()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        info = get_worker_info()
        return i, self.x[i], self.y[i], info.seed if info is not None else -1


def main() -> nn.Module:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="records go to OUT.rank_<r>.jsonl")
    p.add_argument("--final-out", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=36)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--loader", default="plain", choices=["plain", "stateful"])
    p.add_argument("--shuffle", action="store_true", help="shuffle=True instead of a DistributedSampler")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--crash-at-step", type=int, default=None)
    p.add_argument("--no-track-loader", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(1000 + rank)  # ranks draw different dropout masks and torch.rand values

    data = Samples(args.samples)
    sampler = None if args.shuffle else DistributedSampler(data, seed=3)
    loader_cls = DataLoader
    if args.loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader_cls = StatefulDataLoader
    loader = loader_cls(
        data,
        batch_size=args.batch_size,
        sampler=sampler,
        shuffle=args.shuffle,
        num_workers=args.workers,
        persistent_workers=args.persistent,
    )

    torch.manual_seed(0)  # the same initial model on every rank
    model: nn.Module = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    torch.manual_seed(1000 + rank)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    mgr = CheckpointManager(args.ckpt, save_every_n_steps=args.save_every, keep_last=2)
    tracked = {"model": model, "optimizer": opt}
    if not args.no_track_loader:
        tracked["loader"] = loader
    state = mgr.track(**tracked)
    resume = mgr.restore(state)
    step = resume.step + 1 if resume else 0
    out = Path(f"{args.out}.rank_{rank}.jsonl")
    marker = Path(f"{args.ckpt}.crashed")

    for epoch in range(resume.epoch if resume else 0, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for ids, x, y, worker_seeds in loader:
            rng_at_start = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
            noise = torch.rand(1)
            loss = nn.functional.mse_loss(model(x), y) * (1 + 0.01 * noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with out.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss.item().hex(),
                            "ids": ids.tolist(),
                            "worker_seeds": worker_seeds.tolist(),
                            "rand": noise.item().hex(),
                            "rng": rng_at_start,
                        }
                    )
                    + "\n"
                )
            mgr.save(step, state, epoch=epoch)
            if step == args.crash_at_step and rank == 0 and not marker.exists():
                marker.write_text("crashed once")
                os.kill(os.getpid(), signal.SIGKILL)
            step += 1
    mgr.close()
    # Persistent workers were forked after the process group and hold copies of its sockets;
    # left alive until exit, they keep a peer's gloo threads from ever seeing the connection
    # close (a job was seen hanging in ~ProcessGroupGloo). End them before the group goes.
    shutdown_workers = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if args.persistent and shutdown_workers is not None:
        shutdown_workers()
    if args.final_out and rank == 0:
        from safetensors.torch import save_file

        params = (model.module if hasattr(model, "module") else model).state_dict()
        save_file({k: v.contiguous() for k, v in params.items()}, args.final_out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model  # held by the caller until os._exit: freeing a DDP module at exit can deadlock


if __name__ == "__main__":
    model = main()
    # Everything is written, committed and the process group destroyed. Under load, a gloo rank
    # has been seen to abort in C++ teardown at interpreter finalization ("terminate called
    # without an active exception", no Python frame left: README, known issues); skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
