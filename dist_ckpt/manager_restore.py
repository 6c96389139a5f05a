"""``CheckpointManager.restore`` and ``load_weights``: bring a checkpoint back into live objects.

Both run on every rank together. The checkpoint is chosen on rank 0 (``resolve_which``) and
broadcast; its metadata and progress record (step, config, tracked objects) are read on every
rank before a single live tensor is touched, so a refused load (config changed under
``strict_config``, keys or shapes that do not fit) leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dist_ckpt import ddp_buckets, rng
from dist_ckpt.api import load_from
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.config import config_changes
from dist_ckpt.errors import CheckpointNotFound, ConfigError, IncompatibleCheckpoint
from dist_ckpt.loaders import note_untracked_loader
from dist_ckpt.planner import DEFAULT_HINT
from dist_ckpt.progress import KEY, Progress
from dist_ckpt.resume import report_config_changes, resolve_which, warn_if_finished
from dist_ckpt.state import TrainingState
from storage_backends import Backend, open_backend

if TYPE_CHECKING:
    from dist_ckpt.manager_parts import RestoringParts

_MAX_LISTED = 8


@dataclass(frozen=True)
class ResumeInfo:
    """What ``restore`` brought back. ``step``/``epoch`` are those of the checkpoint."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float]
    best: Mapping[str, float]
    epochs_without_improvement: Mapping[str, int]
    tracker_run_id: str | None
    config_changes: tuple[str, ...]
    world_size: int
    uri: str


@dataclass(frozen=True)
class LoadedWeights:
    """What ``load_weights`` loaded: the checkpoint's ``step`` and, as
    ``nn.Module.load_state_dict(strict=False)`` reports them, the model's keys the checkpoint
    lacks (``missing_keys``, left as they were) and the checkpoint's keys the model lacks
    (``unexpected_keys``, ignored). Both are empty with ``strict=True``. ``int(result)`` is the
    step (what ``load_weights`` returned before it returned this)."""

    step: int
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    uri: str

    def __int__(self) -> int:
        return self.step

    def __index__(self) -> int:
        return self.step


def _target(mgr: RestoringParts, which: Any) -> tuple[Backend, str] | None:
    if mgr._tiers is not None:  # the newest step every rank can read, in either tier
        from dist_ckpt.tiers.restore_choice import restore_target

        chosen = restore_target(mgr, which)
        if chosen is not None:
            return chosen
    target = mgr._agree(lambda: resolve_which(mgr._manifest(), mgr.store, which, mgr.config.best))
    if target is None:
        if mgr.config.read_only:
            # A read-only manager never starts a run: nothing here is a wrong root, not a new run.
            raise CheckpointNotFound(
                f"{mgr.root}: no committed checkpoint here (read_only=True, which={which!r}); check the run root "
                "path — a read-only manager only reads an existing run"
            )
        return None
    root, prefix = target
    backend = mgr.backend if root == mgr.backend.uri else open_backend(root, **dict(mgr.config.backend_options))
    return backend, prefix


def _config_note(mgr: RestoringParts, saved: Progress | None) -> tuple[tuple[str, ...], str]:
    """The config changes since the checkpoint, and a sentence naming them for an
    IncompatibleCheckpoint (a changed model size is the usual reason shapes differ)."""
    if saved is None or mgr.config.config is None:
        return (), ""
    changes = tuple(config_changes(saved.config, mgr.config.config))
    if not changes:
        return (), ""
    more = f" (+{len(changes) - _MAX_LISTED} more)" if len(changes) > _MAX_LISTED else ""
    return changes, f"The run config changed since this checkpoint: {'; '.join(changes[:_MAX_LISTED])}{more}. "


def restore_state(mgr: RestoringParts, state: TrainingState, which: Any) -> ResumeInfo | None:
    """See :meth:`CheckpointManager.restore`."""
    if mgr._engine is not None:
        mgr._engine.drain()  # restore what is committed, not what is half-written
    target = _target(mgr, which)
    if target is None:
        return None
    backend, prefix = target
    view = CheckpointView(backend, prefix)  # metadata.json and the progress record, on every rank
    meta = view.meta
    changes, note = _config_note(mgr, view.progress())
    if mgr.config.strict_config and mgr.config.config is not None:
        report_config_changes(mgr.config, changes, warn=False)  # refuse before anything is modified
    sd = state.load_template(set(meta.keys()))
    sd[KEY] = ""
    own_rng = f"{rng.PREFIX}.{rng.rank_key(mgr.rank)}.torch" in meta.tensors
    if own_rng:
        sd[rng.PREFIX] = {rng.rank_key(mgr.rank): rng.template(meta.tensors, mgr.rank)}
    load_from(backend, prefix, sd, process_group=mgr._pg, incompatible_hint=note + DEFAULT_HINT)
    progress = Progress.decode(sd.pop(KEY), view.uri)
    for name, value in progress.values.items():
        if name in state.kinds and state.kinds[name] == "values":
            sd[name] = value
    state.load_state_dict(sd)
    ddp_buckets.restore(
        state.models, progress.ddp_buckets, saved_world=meta.world_size, rank=mgr.rank, where=view.uri
    )  # before the first backward; may warn (rank 0)
    note_untracked_loader(bool(state.loaders), mgr.rank)
    if own_rng:
        rng.apply(sd[rng.PREFIX][rng.rank_key(mgr.rank)])
    else:
        rng.reseed(progress.step, mgr.rank)
    rng.warn_world_size_change(meta.world_size, mgr.world_size, mgr.rank, not own_rng, progress.step)
    changes = tuple(config_changes(progress.config, mgr.config.config)) if mgr.config.config is not None else ()
    report_config_changes(mgr.config, changes, warn=mgr.rank == 0)
    mgr._progress = replace(
        progress, config=mgr.config.config, tracker_run_id=progress.tracker_run_id or mgr.config.tracker_run_id
    )
    warn_if_finished(mgr.config, progress, mgr.rank)
    return ResumeInfo(
        progress.step,
        progress.epoch,
        dict(progress.metrics),
        dict(progress.best),
        dict(progress.since_improvement),
        mgr._progress.tracker_run_id,
        changes,
        meta.world_size,
        view.uri,
    )


def load_model_weights(
    mgr: RestoringParts, module: nn.Module, which: Any, name: str | None, strict: bool
) -> LoadedWeights:
    """See :meth:`CheckpointManager.load_weights`."""
    if mgr._engine is not None:  # the module may be tracked: its overlapped copy first
        mgr._engine.join_copy()
    target = _target(mgr, which)
    if target is None:
        raise CheckpointNotFound(f"{mgr.root}: no committed checkpoint to load weights from")
    backend, prefix = target
    view = CheckpointView(backend, prefix)
    progress = view.progress()
    if progress is None:
        raise ConfigError(f"{view.uri} was written by dist_ckpt.save, not a CheckpointManager; use dist_ckpt.load")
    models = [n for n, kind in progress.objects.items() if kind == "model"]
    if name is None:
        if len(models) != 1:
            raise ConfigError(f"load_weights: the checkpoint holds models {models}; pass name=<one of them>")
        name = models[0]
    elif name not in models:
        raise ConfigError(f"load_weights(name={name!r}): the checkpoint holds models {models}")
    _, note = _config_note(mgr, progress)
    wanted = get_model_state_dict(module)
    stored = {k[len(name) + 1 :] for k in view.meta.keys() if k.startswith(name + ".")}
    missing = tuple(sorted(k for k in wanted if k not in stored))
    unexpected = tuple(sorted(k for k in stored if k not in wanted))
    if strict and (missing or unexpected):
        # as nn.Module.load_state_dict(strict=True); checked on every rank alike, before any load
        parts = [
            f"{what}: {', '.join(keys[:_MAX_LISTED])}"
            + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
            for what, keys in (("missing from the checkpoint", missing), ("unexpected (not in the model)", unexpected))
            if keys
        ]
        raise IncompatibleCheckpoint(
            f"load_weights: {view.uri} model {name!r} does not fit the module — keys {' | keys '.join(parts)}. {note}"
            "Pass strict=False to load the tensors whose names match (it returns the missing and unexpected keys)."
        )
    sd = {name: {k: v for k, v in wanted.items() if k in stored}}
    strict_note = "" if strict else "strict=False skips missing and unexpected keys, not shape mismatches. "
    load_from(backend, prefix, sd, process_group=mgr._pg, incompatible_hint=note + strict_note + "Shapes must agree.")
    set_model_state_dict(module, sd[name], options=StateDictOptions(strict=strict))
    return LoadedWeights(progress.step, missing, unexpected, view.uri)
