"""A user's 2-rank torchrun script (run by test_errors_once_per_rank.py): save a model, resume
it with a changed learning rate (a warning), then resume it into a wider model (an error,
left uncaught as in a training script). Logging is configured as a user would."""

from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist

from dist_ckpt import CheckpointManager

logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s: %(message)s")
root = sys.argv[1]
dist.init_process_group("gloo")
torch.manual_seed(0)

with CheckpointManager(root, config={"lr": 0.1, "hidden": 4}) as mgr:
    mgr.save(0, mgr.track(model=torch.nn.Linear(3, 4)))

with CheckpointManager(root, config={"lr": 0.2, "hidden": 4}) as mgr:  # warns: lr changed
    mgr.restore(mgr.track(model=torch.nn.Linear(3, 4)))
    dist.barrier()
    print(f"rank {dist.get_rank()} resumed", flush=True)

with CheckpointManager(root, config={"lr": 0.1, "hidden": 8}) as mgr:  # fails: the checkpoint's shapes are 4 wide
    mgr.restore(mgr.track(model=torch.nn.Linear(3, 8)))
