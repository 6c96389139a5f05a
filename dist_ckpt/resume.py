"""Resuming: which checkpoint ``which`` names, and how config changes are reported."""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Mapping
from typing import Any

from dist_ckpt import manifest as mf
from dist_ckpt.checkpoint_files import split_checkpoint_uri
from dist_ckpt.config import ManagerConfig
from dist_ckpt.errors import CheckpointNotFound, ConfigChanged, ConfigError
from dist_ckpt.layout import committed_key
from dist_ckpt.progress import Progress
from dist_ckpt.run_store import RunStore, parse_step_prefix, step_prefix

log = logging.getLogger(__name__)

_LISTED_STEPS = 10


def available(manifest: mf.Manifest) -> str:
    """What ``which`` can name in this run: its pointers and latest steps (for error messages)."""
    if not manifest.entries:
        return "the run has no committed checkpoint yet"
    pointers = ", ".join(f"{name!r} (step {step})" for name, step in sorted(manifest.pointers.items()))
    steps = manifest.steps()
    shown = ", ".join(str(s) for s in steps[-_LISTED_STEPS:])
    return (
        f"the run has pointers {pointers or 'none'}; latest steps: {'…, ' if len(steps) > _LISTED_STEPS else ''}{shown}"
    )


def _did_you_mean(which: str, manifest: mf.Manifest) -> str:
    close = difflib.get_close_matches(which, [*manifest.pointers, "last"], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def resolve_which(
    manifest: mf.Manifest, store: RunStore, which: Any, best_modes: Mapping[str, str]
) -> tuple[str, str] | None:
    """``(root uri, checkpoint prefix)`` named by ``which``; None for a new run's ``"last"``.

    Pointers (``last``, ``best:<metric>``) come from the run's manifest, so a manager opened
    without ``best=`` (or a tool) finds every pointer the run has; an unknown ``which`` is
    answered with the pointers and latest steps that exist."""
    if isinstance(which, bool) or not isinstance(which, (int, str)):
        raise ConfigError(f"which={which!r}: expected 'last', 'best:<metric>', a step number, or a checkpoint path/URI")
    if which == "last":
        step = manifest.pointers.get(mf.LAST)
        return None if step is None else (store.uri, step_prefix(step))
    if isinstance(which, str) and which.startswith(mf.BEST_PREFIX):
        metric = which[len(mf.BEST_PREFIX) :]
        step = manifest.pointers.get(which)
        if step is None:
            if metric not in best_modes and metric not in manifest.best_modes:
                raise ConfigError(
                    f"which={which!r}: metric {metric!r} is not tracked by the run at {store.uri} "
                    f"(no {which!r} pointer).{_did_you_mean(which, manifest)} {available(manifest)}"
                )
            raise CheckpointNotFound(
                f"{store.uri}: no checkpoint has a value for {metric!r} yet; {available(manifest)}"
            )
        return store.uri, step_prefix(step)
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    if isinstance(which, int):
        if manifest.entry(which) is None and not store.backend.exists(committed_key(which)):
            raise CheckpointNotFound(f"{store.uri}: no committed checkpoint for step {which}; {available(manifest)}")
        return store.uri, step_prefix(which)
    if parse_step_prefix(which) is not None:
        return store.uri, which
    if "/" in which:
        return split_checkpoint_uri(which)
    raise ConfigError(
        f"which={which!r}: expected 'last', 'best:<metric>', a step number, or the path/URI of one checkpoint."
        f"{_did_you_mean(which, manifest)} At {store.uri}, {available(manifest)}"
    )


def report_config_changes(config: ManagerConfig, changes: tuple[str, ...], *, warn: bool = True) -> None:
    """Warn about config changes key by key, or refuse them under ``strict_config`` (every rank
    refuses; pass ``warn=False`` on every rank but 0, so a job warns once)."""
    if not changes:
        return
    allowed = set(config.config_may_change)
    blocking = [c for c in changes if c.split(":", 1)[0] not in allowed]
    if config.strict_config and blocking:
        raise ConfigChanged(
            "the run config changed since the checkpoint (strict_config=True): "
            + "; ".join(blocking)
            + ". Restore the old values or list the keys in config_may_change."
        )
    if not warn:
        return
    msg = "run config changed since the checkpoint: " + "; ".join(changes)
    warnings.warn(msg, stacklevel=4)
    log.warning(msg)


def warn_if_finished(config: ManagerConfig, progress: Progress, rank: int = 0) -> None:
    """Warn (rank 0 only: once per job) when the checkpoint already reached the run's planned length."""
    cfg = config
    if rank != 0:
        return
    if (cfg.total_steps is not None and progress.step >= cfg.total_steps - 1) or (
        cfg.total_epochs is not None and progress.epoch is not None and progress.epoch >= cfg.total_epochs - 1
    ):
        msg = f"resumed at step {progress.step}, epoch {progress.epoch}: the run's target is already reached"
        warnings.warn(msg, stacklevel=4)
        log.warning(msg)
