"""Configuration of a :class:`~dist_ckpt.CheckpointManager`, validated on construction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dist_ckpt.errors import ConfigError, UnsupportedValue
from dist_ckpt.format import json_values
from dist_ckpt.format.zstd_level import check_level

_MODES = ("min", "max")
_COMPRESSION = ("none", "zstd")
_ASYNC_MODES = ("thread", "process")
_IF_BUSY = ("wait", "skip")


@dataclass(frozen=True, kw_only=True)
class ManagerConfig:
    keep_last: int | None = None
    """Keep the newest N checkpoints (plus every pointed-to one); None keeps all."""

    best: Mapping[str, str] = field(default_factory=dict)
    """Metrics to keep a best checkpoint for: ``{"val_loss": "min", "pck": "max"}``. Each gets
    its own ``best:<metric>`` pointer, kept by retention."""

    keep_every_n_steps: int | None = None
    """Also keep every checkpoint whose step is a multiple of this (milestones)."""

    save_every_n_steps: int | None = None
    """``save()`` writes only on multiples of this — or when a tracked metric improves, or
    with ``force=True``; other calls only update the best/patience bookkeeping."""

    config: Mapping[str, Any] | None = None
    """The run's configuration (e.g. ``vars(args)``), stored as JSON in every checkpoint and
    compared key by key on resume."""

    strict_config: bool = False
    """Refuse to resume (:class:`ConfigChanged`) when the config changed, except the keys in
    ``config_may_change``; otherwise changes are logged as warnings."""

    config_may_change: tuple[str, ...] = ()
    """Dotted config keys allowed to change on resume under ``strict_config``."""

    tracker_run_id: str | None = None
    """Experiment tracker run id (e.g. W&B); restored on resume so the run continues under it."""

    compression: str = "none"
    """Shard codec: ``"none"`` (plain safetensors) or ``"zstd"`` (chunked, byte-grouped)."""

    compression_level: int = 1
    """zstd level when ``compression="zstd"``."""

    incremental: bool = False
    """Incremental checkpoints: an entry (tensor chunk) whose content equals one in the run's
    newest committed checkpoint is not written again; the new checkpoint's file table refers to
    the file that holds it (frozen weights are stored once). Content is hashed on the staged
    copy, in the background for async saves."""

    async_save: bool | str = False
    """Write and commit in the background; ``save()`` returns once the state is staged.
    ``True``: overlapped staging where a tracked optimizer guards it — buffers, RNG and
    non-tensor values are copied inside ``save()``; the parameters in a tracked optimizer's param
    groups and its state are copied in the background during the next forward/backward, and that
    optimizer's ``step()`` waits for the copy if it is not done (everything else, e.g. a model no
    tracked optimizer updates, is copied inside ``save()``). A tracked tensor changed in place
    before the copy is joined fails that save, :class:`SnapshotInconsistent` (never a torn
    snapshot; see :mod:`dist_ckpt.overlap` for what the check can miss). The write starts once
    the copy is joined: at that step, ``wait_staged()``, ``wait()``, the next ``save()`` or
    ``close()`` (call ``wait_staged()`` after a save followed by a long pause without optimizer
    steps, e.g. an evaluation, to have it committed meanwhile). ``"staged"``: the whole
    copy inside ``save()`` (for loops that change parameters in place outside
    ``optimizer.step()``). ``"overlap"``: like True, and every tracked model's parameters are
    deferred too (frozen weights included: only for loops where nothing else writes them)."""

    async_mode: str = "thread"
    """Background worker: ``"thread"`` or ``"process"``."""

    ddp_spread_writes: bool = True
    """Under DDP, parameters and their optimizer state (the same on every rank) are written by
    all ranks in balanced parts; buffers and everything else by rank 0. False: rank 0 writes
    every replicated tensor."""

    if_busy: str = "wait"
    """When a save is still in flight: ``"wait"`` for it, or ``"skip"`` the new one (logged)."""

    max_staging_bytes: int | None = None
    """Cap on staging memory for async saves: a rank whose tensors exceed it saves
    synchronously from the live tensors instead (no staging buffer; ``save()`` blocks for the
    whole save) — never more memory, a longer stall."""

    save_on_sigterm: bool = False
    """On SIGTERM, finish the in-flight save; ``should_stop()`` then turns True so the loop
    saves the current step and exits."""

    total_steps: int | None = None
    """The run's planned length; resuming at or past it warns."""

    total_epochs: int | None = None
    """The run's planned epochs; resuming at or past the last warns."""

    collect_garbage_on_start: bool = True
    """Remove leftovers of crashed saves when the manager starts (coordinator only)."""

    read_only: bool = False
    """Open the run for reading only (listing, restoring, loading weights): no writer lock,
    no garbage collection, ``save()`` refused. Tools and evaluation jobs use this."""

    lock_stale_after: float = 600.0
    """Seconds without a heartbeat after which this job's run lock counts as abandoned to a job
    on another host (the heartbeat thread renews it every ``lock_stale_after / 4``; on the same
    host the lock is kept while the process lives and taken over at once when it is gone). A job
    paused longer than this may lose the run; its commits are then fenced (``RunLocked``)."""

    backend_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to the storage backend (e.g. S3 ``part_size``, ``max_concurrency``, ``endpoint_url``)."""

    unsafe_single_writer: bool = False
    """Write even through an S3 server that ignores conditional writes (``If-None-Match: *``,
    ``If-Match``). A writing manager checks once per bucket at start that the server refuses
    them when their condition fails, and otherwise raises :class:`StorageError`: the commit
    protocol, the manifest's compare-and-swap and the run lock rest on them, and without them
    two jobs writing one run could both commit a step or lose each other's pointer updates,
    silently. Set this only when you are sure one job at a time writes the run; a warning is
    logged at every start. Local and NFS roots are not affected."""

    local_root: str | None = None
    """A fast node-local directory (NVMe, tmpfs) for a second tier: ``save()`` commits there
    first (same format and protocol); a node-local uploader process then promotes committed
    checkpoints to ``root`` in the background, and finishes even if the job dies. None: one tier."""

    local_keep_last: int = 2
    """With ``local_root``: keep the newest N checkpoints in the local tier (a step leaves it only
    once its due promotion to ``root`` is committed)."""

    persist_every_n_saves: int = 1
    """With ``local_root``: promote every N-th save to ``root`` — and every save that moves a
    ``best:<metric>`` pointer or is made with ``force=True``."""

    def __post_init__(self) -> None:
        for name in (
            "keep_last",
            "keep_every_n_steps",
            "save_every_n_steps",
            "total_steps",
            "total_epochs",
            "max_staging_bytes",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}={value!r}: expected a positive integer or None")
        for name in ("local_keep_last", "persist_every_n_saves"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if self.local_root is not None and (
            not isinstance(self.local_root, str) or not self.local_root or "://" in self.local_root
        ):
            raise ConfigError(f"local_root={self.local_root!r}: expected a node-local directory path (not a URI)")
        if not isinstance(self.best, Mapping):
            raise ConfigError(f"best={self.best!r}: expected a dict like {{'val_loss': 'min'}}")
        for metric, mode in self.best.items():
            if not isinstance(metric, str) or not metric or ":" in metric:
                raise ConfigError(f"best: metric name {metric!r} must be a non-empty string without ':'")
            if mode not in _MODES:
                raise ConfigError(f"best[{metric!r}]={mode!r}: expected 'min' or 'max'")
        if not isinstance(self.unsafe_single_writer, bool):
            raise ConfigError(f"unsafe_single_writer={self.unsafe_single_writer!r}: expected True or False")
        if not isinstance(self.lock_stale_after, (int, float)) or self.lock_stale_after <= 0:
            raise ConfigError(f"lock_stale_after={self.lock_stale_after!r}: expected a positive number of seconds")
        if self.compression not in _COMPRESSION:
            raise ConfigError(f"compression={self.compression!r}: expected one of {_COMPRESSION}")
        if self.async_mode not in _ASYNC_MODES:
            raise ConfigError(f"async_mode={self.async_mode!r}: expected one of {_ASYNC_MODES}")
        if self.if_busy not in _IF_BUSY:
            raise ConfigError(f"if_busy={self.if_busy!r}: expected one of {_IF_BUSY}")
        check_level(self.compression_level, "compression_level")
        if self.incremental and self.local_root is not None:
            # a promotion copies a step's own files; references into older local steps are not promoted yet
            raise ConfigError("incremental=True with local_root: not supported together yet; choose one of them")
        if not (isinstance(self.async_save, bool) or self.async_save in ("staged", "overlap")):
            raise ConfigError(f"async_save={self.async_save!r}: expected True, False, 'staged' or 'overlap'")
        for name in (
            "strict_config",
            "save_on_sigterm",
            "collect_garbage_on_start",
            "ddp_spread_writes",
            "incremental",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected True or False")
        may_change = self.config_may_change
        if not isinstance(may_change, (tuple, list, set, frozenset)) or not all(isinstance(k, str) for k in may_change):
            # a bare string would silently allow its letters: config_may_change="lr" → ("l", "r")
            raise ConfigError(f"config_may_change={may_change!r}: expected a tuple of dotted keys, e.g. ('optim.lr',)")
        object.__setattr__(self, "config_may_change", tuple(may_change))
        if not isinstance(self.backend_options, Mapping):
            raise ConfigError(f"backend_options={self.backend_options!r}: expected a dict of storage backend options")
        if self.tracker_run_id is not None and not isinstance(self.tracker_run_id, str):
            raise ConfigError(f"tracker_run_id={self.tracker_run_id!r}: expected a string")
        if self.config is not None:
            if not isinstance(self.config, Mapping):
                raise ConfigError(f"config: expected a dict (e.g. vars(args)), got {type(self.config).__name__}")
            try:
                json_values.encode(dict(self.config), "config")
            except UnsupportedValue as e:
                raise ConfigError(f"config is not JSON-serialisable: {e}") from e

    def config_hash(self) -> str | None:
        if self.config is None:
            return None
        canonical = json.dumps(json_values.to_json(dict(self.config)), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten_config(config: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """Changes as ``"key: old -> new"`` lines, sorted by key."""
    old, new = flatten_config(saved), flatten_config(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"{key}: {old[key]!r} -> (removed)")
        elif key not in old:
            lines.append(f"{key}: (absent) -> {new[key]!r}")
        elif old[key] != new[key]:
            lines.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return lines
