"""The constructor of :class:`~dist_ckpt.CheckpointManager`: every option an explicit
keyword-only parameter with its documentation, so ``help()`` and IDEs show them.

The options are the fields of :class:`~dist_ckpt.config.ManagerConfig` (validated there); the
parameters below mirror them one for one, in the same order, with the same documentation —
``tests/unit/test_manager_keywords.py`` fails if the two drift apart. An unknown keyword is a
:class:`ConfigError` that suggests the closest option ("did you mean ...").
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from dist_ckpt.config import ManagerConfig
from dist_ckpt.errors import ConfigError

if TYPE_CHECKING:
    import torch.distributed as dist

    from storage_backends import Backend

P = ParamSpec("P")
R = TypeVar("R")


def reject_unknown_options(init: Callable[P, R]) -> Callable[P, R]:
    """Turn an unknown keyword (Python's bare ``TypeError``) into a :class:`ConfigError` naming
    it and the closest valid option. ``functools.wraps`` keeps the real signature for
    ``inspect.signature``, ``help()`` and IDEs."""
    valid = [p.name for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(init)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, valid, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"CheckpointManager: unknown option {', '.join(hints)}; the options are: {', '.join(valid)} "
                "(see help(CheckpointManager))"
            )
        return init(*args, **kwargs)

    return checked


def _defaulted(name: str, value: Any) -> Any:
    """A field with a default factory (a dict) takes ``None`` in the signature: a shared
    mutable default there would be a trap."""
    field = _FIELDS[name]
    if value is None and field.default is MISSING and field.default_factory is not MISSING:
        return field.default_factory()
    return value


_FIELDS = {f.name: f for f in fields(ManagerConfig)}


class ManagerKeywords:
    """Base of :class:`~dist_ckpt.CheckpointManager` holding its keyword-only constructor."""

    @reject_unknown_options
    def __init__(
        self,
        root: str,
        *,
        process_group: dist.ProcessGroup | None = None,
        backend: Backend | None = None,
        keep_last: int | None = None,
        best: Mapping[str, str] | None = None,
        keep_every_n_steps: int | None = None,
        save_every_n_steps: int | None = None,
        config: Mapping[str, Any] | None = None,
        strict_config: bool = False,
        config_may_change: tuple[str, ...] = (),
        tracker_run_id: str | None = None,
        compression: str = "none",
        compression_level: int = 1,
        incremental: bool = False,
        async_save: bool | str = False,
        async_mode: str = "thread",
        ddp_spread_writes: bool = True,
        if_busy: str = "wait",
        max_staging_bytes: int | None = None,
        save_on_sigterm: bool = False,
        total_steps: int | None = None,
        total_epochs: int | None = None,
        collect_garbage_on_start: bool = True,
        read_only: bool = False,
        lock_stale_after: float = 600.0,
        backend_options: Mapping[str, Any] | None = None,
        unsafe_single_writer: bool = False,
        local_root: str | None = None,
        local_keep_last: int = 2,
        persist_every_n_saves: int = 1,
    ):
        """Open the run at ``root`` (a local/NFS path or ``s3://bucket/prefix``; created on the
        first save). Every rank constructs the manager together (it runs collectives).

        Args:
            root: The run root: a path or ``s3://`` URI.
            process_group: Collectives run on this group; the default group (or none, in a
                single process) when None.
            backend: Replaces the backend ``root`` would open (e.g. an ``S3Backend`` built
                around your own boto3 client, or a wrapper).
            keep_last: Keep the newest N checkpoints (plus every pointed-to one); None keeps all.
            best: Metrics to keep a best checkpoint for: ``{"val_loss": "min", "pck": "max"}``.
                Each gets its own ``best:<metric>`` pointer, kept by retention.
            keep_every_n_steps: Also keep every checkpoint whose step is a multiple of this
                (milestones).
            save_every_n_steps: ``save()`` writes only on multiples of this — or when a tracked
                metric improves, or with ``force=True``; other calls only update the
                best/patience bookkeeping.
            config: The run's configuration (e.g. ``vars(args)``), stored as JSON in every
                checkpoint and compared key by key on resume.
            strict_config: Refuse to resume (:class:`ConfigChanged`) when the config changed,
                except the keys in ``config_may_change``; otherwise changes are logged as
                warnings.
            config_may_change: Dotted config keys allowed to change on resume under
                ``strict_config``.
            tracker_run_id: Experiment tracker run id (e.g. W&B); restored on resume so the run
                continues under it.
            compression: Shard codec: ``"none"`` (plain safetensors) or ``"zstd"`` (chunked,
                byte-grouped).
            compression_level: zstd level when ``compression="zstd"``.
            incremental: Incremental checkpoints: an entry (tensor chunk) whose content equals
                one in the run's newest committed checkpoint is not written again; the new
                checkpoint's file table refers to the file that holds it (frozen weights are
                stored once). Content is hashed on the staged copy, in the background for async
                saves.
            async_save: Write and commit in the background; ``save()`` returns once the state is
                staged. ``True``: overlapped staging where a tracked optimizer guards it — buffers,
                RNG and non-tensor values are copied inside ``save()``; the parameters in a tracked
                optimizer's param groups and its state are copied in the background during the next
                forward/backward, and that optimizer's ``step()`` waits for the copy if it is not
                done (everything else, e.g. a model no tracked optimizer updates, is copied inside
                ``save()``). A tracked tensor changed in place before the copy is joined fails that
                save, :class:`SnapshotInconsistent` (never a torn snapshot; see
                :mod:`dist_ckpt.overlap` for what the check can miss). The write starts once the
                copy is joined: at that step, ``wait_staged()``, ``wait()``, the next ``save()`` or
                ``close()`` (call ``wait_staged()`` after a save followed by a long pause without
                optimizer steps, e.g. an evaluation, to have it committed meanwhile). ``"staged"``:
                the whole copy inside ``save()`` (for loops that change parameters in place outside
                ``optimizer.step()``). ``"overlap"``: like True, and every tracked model's
                parameters are deferred too (frozen weights included: only for loops where nothing
                else writes them).
            async_mode: Background worker: ``"thread"`` or ``"process"``.
            ddp_spread_writes: Under DDP, parameters and their optimizer state (the same on
                every rank) are written by all ranks in balanced parts; buffers and everything
                else by rank 0. False: rank 0 writes every replicated tensor.
            if_busy: When a save is still in flight: ``"wait"`` for it, or ``"skip"`` the new
                one (logged).
            max_staging_bytes: Cap on staging memory for async saves: a rank whose tensors
                exceed it saves synchronously from the live tensors instead (no staging buffer;
                ``save()`` blocks for the whole save) — never more memory, a longer stall.
            save_on_sigterm: On SIGTERM, finish the in-flight save; ``should_stop()`` then turns
                True so the loop saves the current step and exits.
            total_steps: The run's planned length; resuming at or past it warns.
            total_epochs: The run's planned epochs; resuming at or past the last warns.
            collect_garbage_on_start: Remove leftovers of crashed saves when the manager starts
                (coordinator only).
            read_only: Open the run for reading only (listing, restoring, loading weights): no
                writer lock, no garbage collection, ``save()`` refused. Tools and evaluation
                jobs use this.
            lock_stale_after: Seconds without a heartbeat after which this job's run lock
                counts as abandoned to a job on another host (the heartbeat thread renews it
                every ``lock_stale_after / 4``; on the same host the lock is kept while the
                process lives and taken over at once when it is gone). A job paused longer than
                this may lose the run; its commits are then fenced (``RunLocked``).
            backend_options: Passed to the storage backend (e.g. S3 ``part_size``,
                ``max_concurrency``, ``endpoint_url``).
            unsafe_single_writer: Write even through an S3 server that ignores conditional
                writes (``If-None-Match: *``, ``If-Match``). A writing manager checks once per
                bucket at start that the server refuses them when their condition fails, and
                otherwise raises :class:`StorageError`: the commit protocol, the manifest's
                compare-and-swap and the run lock rest on them, and without them two jobs
                writing one run could both commit a step or lose each other's pointer updates,
                silently. Set this only when you are sure one job at a time writes the run; a
                warning is logged at every start. Local and NFS roots are not affected.
            local_root: A fast node-local directory (NVMe, tmpfs) for a second tier: ``save()``
                commits there first (same format and protocol); a node-local uploader process
                then promotes committed checkpoints to ``root`` in the background, and finishes
                even if the job dies. None: one tier.
            local_keep_last: With ``local_root``: keep the newest N checkpoints in the local tier
                (a step leaves it only once its due promotion to ``root`` is committed).
            persist_every_n_saves: With ``local_root``: promote every N-th save to ``root`` — and
                every save that moves a ``best:<metric>`` pointer or is made with ``force=True``.

        Raises:
            ConfigError: an invalid or unknown option (naming it).
            RunLocked: another job holds the run's writer lock.
        """
        given = locals()  # exactly the parameters above: the options are ManagerConfig's fields
        options = {name: _defaulted(name, given[name]) for name in _FIELDS}
        self._open(str(root), ManagerConfig(**options), process_group=process_group, backend=backend)

    def _open(
        self, root: str, config: ManagerConfig, *, process_group: dist.ProcessGroup | None, backend: Backend | None
    ) -> None:
        raise NotImplementedError  # CheckpointManager opens the run
