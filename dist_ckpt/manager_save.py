"""The save path of :meth:`CheckpointManager.save`: decide (on rank 0, shared), build the
state dict, then write it — in the background (:class:`~dist_ckpt.async_engine.AsyncEngine`)
or here (:func:`dist_ckpt.api.save_to`) — and follow the commit with the manager's
:meth:`~CheckpointManager._after_commit` (the manifest update and retention)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dist_ckpt import ddp_buckets, overlap, rng, spread_writes
from dist_ckpt.api import save_to
from dist_ckpt.decision import share_decision
from dist_ckpt.errors import ConfigError
from dist_ckpt.progress import KEY, check_metrics
from dist_ckpt.run_store import step_prefix
from dist_ckpt.state import TrainingState

if TYPE_CHECKING:
    from dist_ckpt.manager import CheckpointManager

log = logging.getLogger("dist_ckpt.manager")  # the if_busy warning keeps its logger name


def save_step(
    mgr: CheckpointManager,
    step: int,
    state: TrainingState,
    metrics: Mapping[str, Any] | None,
    epoch: int | None,
    force: bool,
) -> bool:
    """:meth:`CheckpointManager.save` (every rank together); whether a checkpoint was written."""
    if mgr.config.read_only:
        raise ConfigError(f"{mgr.root} was opened with read_only=True; save() needs a writable manager")
    if not isinstance(state, TrainingState):
        raise ConfigError("save(step, state): state must come from mgr.track(...)")
    prefix = step_prefix(step)  # validates step
    engine = mgr._engine  # async: whether rank 0's save is still running rides on the decision
    decision, busy = share_decision(
        lambda: (
            mgr._decide(step, check_metrics(metrics), epoch, force),
            engine is not None and engine.busy_here(),
        ),
        rank=mgr.rank,
        base=mgr._progress,
        agree=mgr._agree,
        group=mgr._pg if mgr._distributed else None,
        distributed=mgr._distributed,
    )
    if engine is not None:  # raises a finished background save's failure (on every rank)
        busy = engine.settle(busy)
    progress, due = decision
    if not due:
        mgr._progress = progress
        return False
    if busy and mgr.config.if_busy == "skip":
        if mgr.rank == 0:  # the decision is the job's: one warning, not one per rank
            log.warning("step %d not saved: the previous save is still in flight (if_busy='skip')", step)
        mgr._progress = progress
        return False
    sd = state.state_dict()
    layouts = ddp_buckets.capture(state.models)  # may settle DDP's pending bucket rebuild (collective)
    sd[KEY] = replace(progress, objects=state.describe(), values=_values_of(state), ddp_buckets=layouts).encode()
    sd[rng.PREFIX] = {rng.rank_key(mgr.rank): rng.capture()}
    commit_info = {
        "step": step,
        "epoch": epoch,
        "metrics": dict(progress.metrics),
        "time": time.time(),
        "codec": mgr._codec.name if mgr._codec else "none",
        **({"incremental": True} if mgr.config.incremental else {}),  # dist_ckpt.incremental
    }
    fence = mgr._lock.fence if mgr._lock is not None else None  # rank 0: checked right before COMMITTED
    spread = spread_writes.replicated_fqns(state, sd, mgr.world_size) if mgr.config.ddp_spread_writes else frozenset()
    after_commit, on_every_rank = (lambda: mgr._after_commit(step)), None
    background_after_commit = lambda: mgr._background_after_commit(step)  # noqa: E731
    if mgr._tiers is not None:  # the local commit needs no run lock; the node's uploader promotes
        after_commit, on_every_rank = mgr._tiers.hooks(
            step, force=force, before=mgr._progress.best, after=progress.best
        )
        background_after_commit, fence = after_commit, None
    if mgr._engine is not None and mgr.config.async_save:
        # returns once the tensors are staged; write, commit and _after_commit run in the background
        deferrable = (
            overlap.prepare(state, mgr._engine.join_copy) if mgr.config.async_save == "overlap" else frozenset()
        )
        mgr._engine.submit(
            step, prefix, sd, commit_info, background_after_commit, fence, deferrable, spread, on_every_rank
        )
        mgr._progress = progress
        return True
    save_to(
        mgr._save_backend,
        prefix,
        sd,
        codec=mgr._codec,
        commit_info=commit_info,
        process_group=mgr._pg,
        fence=fence,
        spread=spread,
    )
    result = mgr._agree(after_commit)
    if on_every_rank is not None:
        mgr._tiers.everywhere(on_every_rank, result)
    mgr._progress = progress
    return True


def _values_of(state: TrainingState) -> dict[str, Any]:
    return {name: dict(obj) for name, obj in state.objects.items() if state.kinds[name] == "values"}
