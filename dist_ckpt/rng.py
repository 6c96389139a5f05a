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
from collections.abc import Mapping
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
    cuda = _cuda_states()
    if cuda is not None:
        state["cuda"] = cuda
    return state


def _cuda_states() -> list[torch.Tensor] | None:
    """Each CUDA device's generator state, or None when this process never initialised CUDA.

    The states are read from the generator objects, which live on the host: no device is made
    current and no CUDA context is created. Under torchrun every rank sees every GPU, and a
    context costs hundreds of MB per device, so a capture must not touch devices a rank never
    used. A process that never initialised CUDA drew nothing from a CUDA generator; its manual
    seeds are still queued and are applied by CUDA's lazy initialisation as usual."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return [generator.get_state() for generator in torch.cuda.default_generators]


def template(stored: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """A state dict to load rank ``rank``'s saved RNG states into (values are replaced).

    ``stored`` is the checkpoint's DCP ``state_dict_metadata``. The CUDA entries are shaped from
    it, not captured here: a restore must not initialise CUDA either, and the checkpoint may
    hold CUDA states although this process has not touched a device yet."""
    state = capture()
    state.pop("cuda", None)
    prefix = f"{PREFIX}.{rank_key(rank)}.cuda."
    cuda = []
    while (entry := stored.get(f"{prefix}{len(cuda)}")) is not None:
        cuda.append(torch.empty(tuple(entry.size), dtype=torch.uint8))
    if cuda:
        state["cuda"] = cuda
    return state


def apply(state: dict[str, Any]) -> None:
    """Restore states produced by :func:`capture` (after a round trip through a checkpoint)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        # set_rng_state sets the generator object (queued until CUDA initialises): no context.
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
            + (
                "Rank 0 restored its own saved RNG state."
                if saved_world == 1
                else f"Ranks 0..{saved_world - 1} restored their own saved RNG states."
            )
        )
    else:
        others = "" if world == 1 else f" (and ranks 1..{world - 1} theirs)"
        msg += (
            f"Rank 0 restored its own saved RNG state{others}; "
            f"the saved states of ranks {world}..{saved_world - 1} are unused."
        )
    warnings.warn(msg, stacklevel=4)  # the caller of CheckpointManager.restore
    log.warning(msg)
