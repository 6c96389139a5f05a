"""The save path of :meth:`CheckpointManager.save`: decide (on rank 0, shared), build the
state dict, then write it — in the background (:class:`~dist_ckpt.async_engine.AsyncEngine`)
or here (:func:`dist_ckpt.api.save_to`) — and follow the commit with rank 0's
:class:`~dist_ckpt.commit_follow_up.CommitFollowUp` (the manifest update and retention)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dist_ckpt import ddp_buckets, overlap, rng, spread_writes
from dist_ckpt.api import save_to
from dist_ckpt.async_job import CommitHooks
from dist_ckpt.decision import share_decision
from dist_ckpt.errors import ConfigError
from dist_ckpt.progress import KEY, check_metrics
from dist_ckpt.run_store import step_prefix
from dist_ckpt.state import TrainingState

if TYPE_CHECKING:
    from dist_ckpt.manager_parts import SavingParts

log = logging.getLogger("dist_ckpt.manager")  # the if_busy warning keeps its logger name


def save_step(
    mgr: SavingParts,
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
    if mgr._tiers is not None:  # the local commit needs no run lock; the node's uploader promotes
        after_commit, on_every_rank = mgr._tiers.hooks(
            step, force=force, before=mgr._progress.best, after=progress.best
        )
        hooks, fence = CommitHooks(after_commit=after_commit, on_every_rank=on_every_rank), None
    else:  # rank 0's manifest update and retention, from values (no manager code in the worker)
        follow_up = mgr._commit_follow_up(step)
        hooks = CommitHooks(
            after_commit=lambda: follow_up.record(deletes_later=True),
            after_verdict=follow_up.delete_dropped,
            on_consumed=lambda kept: mgr._committed(kept.last_step if kept is not None else None),
        )
    if mgr._engine is not None and mgr.config.async_save:
        # returns once the tensors are staged; write, commit and the hooks run in the background
        deferrable = overlap.prepare(state, mgr._engine.join_copy, mgr.config.async_save)
        mgr._engine.submit(step, prefix, sd, commit_info, hooks, fence, deferrable, spread)
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
    if mgr._tiers is not None:
        assert hooks.after_commit is not None and hooks.on_every_rank is not None
        mgr._tiers.everywhere(hooks.on_every_rank, mgr._agree(hooks.after_commit))
    else:
        mgr._committed(mgr._agree(lambda: follow_up.record().last_step))
    mgr._progress = progress
    return True


def _values_of(state: TrainingState) -> dict[str, Any]:
    return {name: dict(obj) for name, obj in state.objects.items() if state.kinds[name] == "values"}
