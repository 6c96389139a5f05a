"""A small training job that takes its checkpoint flags from ``dist_ckpt.add_checkpoint_args``
and applies them with ``mgr.start(state, args)``: the real script the flag tests run.

It trains ``--train-steps`` steps after its start point, saving every step with the metric
``score = -|step - 3|`` (so ``best:score`` is step 3 once a run reached it), and writes a JSON
report of what ``start`` did: the step resumed (or None), the first step trained, the model
parameters right after the start, whether the optimizer had state, the counters and best values.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from dist_ckpt import CheckpointManager, add_checkpoint_args


def build_model() -> nn.Module:
    return nn.Linear(4, 3)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_checkpoint_args(parser)
    parser.add_argument("--train-steps", type=int, default=0, help="steps to train after the start point")
    parser.add_argument("--report", required=True, help="JSON report of what start() did")
    return parser


def track(mgr: CheckpointManager) -> tuple[nn.Module, torch.optim.Optimizer, dict, object]:
    """The job's model (seed 0), optimizer and counters, tracked by ``mgr``."""
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    counters = {"examples": 0}
    return model, opt, counters, mgr.track(model=model, optimizer=opt, counters=counters)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    args = build_parser().parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    mgr = CheckpointManager(args.ckpt, best={"score": "max"}, save_every_n_steps=1)
    model, opt, counters, state = track(mgr)
    info = mgr.start(state, args)
    start = info.step + 1 if info else 0
    report = {
        "resumed_step": info.step if info else None,
        "resumed_uri": info.uri if info else None,
        "first_step": start,
        "optimizer_state": bool(opt.state),
        "counters": dict(counters),
        "best": dict(mgr.best),
        "params": {k: v.tolist() for k, v in model.state_dict().items()},
    }
    for step in range(start, start + args.train_steps):
        train_step(model, opt)
        counters["examples"] += 8
        mgr.save(step, state, metrics={"score": -abs(step - 3)})
    mgr.close()
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.report, "w") as f:
            json.dump(report, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
