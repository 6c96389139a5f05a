"""FSDP2 (fully_shard) training on CPU with dist_ckpt: sharded save, exact resume, any world size.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --ckpt /tmp/run1 --steps 40
    torchrun --nproc-per-node 2 examples/train_fsdp.py --ckpt /tmp/run2 --resume /tmp/run1/step_000000039

The same loop and options as train_ddp.py (``--async``, ``--save-on-sigterm``, ...); only the
model is sharded with ``fully_shard`` instead of wrapped in DDP.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import train_ddp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402


def wrap_fsdp(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


if __name__ == "__main__":
    model = train_ddp.main(wrap=wrap_fsdp, doc=__doc__)  # held until the exit
    common.exit_without_finalization()  # see its docstring: a PyTorch gloo teardown race
