"""RNG state of every generator, per rank and per device.

Each rank saves Python's ``random``, NumPy's global generator, torch's CPU generator and, when
CUDA is present, every CUDA device's generator, under ``rng.rank_<r>.*``. Each rank restores
its own. When the world size changed, ranks with a saved state restore it and new ranks are
reseeded deterministically from ``(step, rank)``, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import random
import warnings
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "rng"


def rank_key(rank: int) -> str:
    return f"rank_{rank}"


def capture() -> dict[str, Any]:
    """This process's RNG states (CPU tensors and JSON-able values)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    return state


def template() -> dict[str, Any]:
    """A state dict of the right shapes for loading into (values are replaced)."""
    return capture()


def apply(state: dict[str, Any]) -> None:
    """Restore states produced by :func:`capture` (after a round trip through a checkpoint)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        devices = torch.cuda.device_count()
        saved = state["cuda"]
        if len(saved) != devices:
            warnings.warn(
                f"checkpoint holds RNG states of {len(saved)} CUDA devices, this rank sees {devices}; "
                "restoring the first min(saved, visible)",
                stacklevel=2,
            )
        for i in range(min(len(saved), devices)):
            torch.cuda.set_rng_state(saved[i].to(torch.uint8), i)


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def reseed(step: int, rank: int) -> int:
    """Seed every generator from ``(step, rank)`` deterministically; returns the seed."""
    seed = int.from_bytes(hashlib.sha256(f"dist_ckpt:{step}:{rank}".encode()).digest()[:8], "little") % (2**63)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def warn_world_size_change(saved_world: int, world: int, rank: int, reseeded: bool, step: int) -> None:
    """One warning for the whole job, from rank 0 (every rank calls this): which ranks restored
    their own RNG state and which were reseeded. ``reseeded`` is this rank's own fact; the job's
    follows from the world sizes (rank r restores its state iff r < saved_world)."""
    if saved_world == world or rank != 0:
        return
    msg = f"world size changed: the checkpoint was saved by {saved_world} ranks, this job has {world}. "
    if world > saved_world:
        new = f"Rank {saved_world}" if world == saved_world + 1 else f"Ranks {saved_world}..{world - 1}"
        msg += (
            f"{new} had no saved RNG state and {'was' if world == saved_world + 1 else 'were'} reseeded from "
            f"(step={step}, rank=<the rank>); random streams after the resume differ from an uninterrupted run. "
            + ("Rank 0 restored its own saved RNG state." if saved_world == 1
               else f"Ranks 0..{saved_world - 1} restored their own saved RNG states.")  # fmt: skip
        )
    else:
        others = "" if world == 1 else f" (and ranks 1..{world - 1} theirs)"
        msg += f"Rank 0 restored its own saved RNG state{others}; the saved states of ranks {world}..{saved_world - 1} are unused."
    warnings.warn(msg, stacklevel=4)  # the caller of CheckpointManager.restore
    log.warning(msg)
