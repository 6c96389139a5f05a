"""Resuming: which checkpoint ``which`` names, and how config changes are reported."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from dist_ckpt import manifest as mf
from dist_ckpt.api import split_checkpoint_uri
from dist_ckpt.config import ManagerConfig
from dist_ckpt.errors import CheckpointNotFound, ConfigChanged, ConfigError
from dist_ckpt.progress import Progress
from dist_ckpt.run_store import RunStore, parse_step_prefix, step_prefix

log = logging.getLogger(__name__)


def resolve_which(manifest: mf.Manifest, store: RunStore, which: Any, best_modes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(root uri, checkpoint prefix)`` named by ``which``; None for a new run's ``"last"``."""
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
                raise ConfigError(f"which={which!r}: metric {metric!r} is not tracked (best={dict(best_modes)})")
            raise CheckpointNotFound(f"{store.uri}: no checkpoint has a value for {metric!r} yet")
        return store.uri, step_prefix(step)
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    if isinstance(which, int):
        if manifest.entry(which) is None and not store.backend.exists(f"{step_prefix(which)}/COMMITTED"):
            have = ", ".join(str(s) for s in manifest.steps()[-10:]) or "none"
            raise CheckpointNotFound(f"{store.uri}: no committed checkpoint for step {which} (latest steps: {have})")
        return store.uri, step_prefix(which)
    if parse_step_prefix(which) is not None:
        return store.uri, which
    if "/" in which:
        return split_checkpoint_uri(which)
    raise ConfigError(
        f"which={which!r}: expected 'last', 'best:<metric>', a step number, or the path/URI of one checkpoint"
    )


def report_config_changes(config: ManagerConfig, changes: tuple[str, ...], *, warn: bool = True) -> None:
    """Warn about config changes key by key, or refuse them under ``strict_config``."""
    if not changes:
        return
    allowed = set(config.config_may_change)
    blocking = [c for c in changes if c.split(":", 1)[0] not in allowed]
    if config.strict_config and blocking:
        raise ConfigChanged(
            "the run config changed since the checkpoint (strict_config=True): " + "; ".join(blocking)
            + ". Restore the old values or list the keys in config_may_change."
        )
    if not warn:
        return
    msg = "run config changed since the checkpoint: " + "; ".join(changes)
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


def warn_if_finished(config: ManagerConfig, progress: Progress) -> None:
    """Warn when the checkpoint already reached the run's planned length."""
    cfg = config
    if (cfg.total_steps is not None and progress.step >= cfg.total_steps - 1) or (
        cfg.total_epochs is not None and progress.epoch is not None and progress.epoch >= cfg.total_epochs - 1
    ):
        msg = f"resumed at step {progress.step}, epoch {progress.epoch}: the run's target is already reached"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
