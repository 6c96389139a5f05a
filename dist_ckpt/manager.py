"""CheckpointManager: when to save, best/last pointers, retention, exact resume.

Every rank calls every method together (they run collectives). Decisions — whether a step is
saved, which checkpoint ``which`` names, the metrics recorded — are taken on rank 0 and
broadcast, so ranks can never disagree; rank 0's ``metrics`` are the ones recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch.distributed as dist
from torch import nn

from dist_ckpt import manifest as mf
from dist_ckpt.api import release_codec_buffers, resolve_codec
from dist_ckpt.commit_follow_up import CommitFollowUp, RunPolicy
from dist_ckpt.config import ManagerConfig
from dist_ckpt.decision import settle_sends
from dist_ckpt.errors import (
    CheckpointError,
    ConfigError,
    StepAlreadyExists,
)
from dist_ckpt.layout import COMMITTED
from dist_ckpt.manager_keywords import ManagerKeywords
from dist_ckpt.manager_listing import CheckpointInfo, list_checkpoints, stored_manifest
from dist_ckpt.manager_restore import LoadedWeights, ResumeInfo, load_model_weights, restore_state
from dist_ckpt.manager_save import save_step
from dist_ckpt.preemption import EXIT_CODE
from dist_ckpt.progress import Progress
from dist_ckpt.run_lock import RunLock
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.state import TrainingState
from dist_ckpt.write_guard import require_conditional_writes
from storage_backends import Backend, join_key, open_backend

log = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "CheckpointManager", "LoadedWeights", "ResumeInfo"]


class CheckpointManager(ManagerKeywords):
    """Saves and restores a run's whole training state under ``root`` (a path or ``s3://`` URI).

    ``CheckpointManager(root, *, keep_last=..., best=..., ...)``: every option is a keyword-only
    parameter of the constructor, documented there (``help(CheckpointManager.__init__)``); they
    are validated as the fields of :class:`ManagerConfig`, kept in ``self.config``."""

    def _open(
        self, root: str, config: ManagerConfig, *, process_group: dist.ProcessGroup | None, backend: Backend | None
    ) -> None:
        # called by ManagerKeywords.__init__ with the validated options
        self.config = config
        self.root = str(root)
        self._pg = process_group
        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self._distributed else 0
        self.world_size = dist.get_world_size(process_group) if self._distributed else 1
        try:
            # An injected backend (a wrapper, a preconfigured S3 client) is used as is.
            self.backend: Backend = backend or open_backend(self.root, **dict(self.config.backend_options))
        except ValueError as e:
            raise ConfigError(f"CheckpointManager root {self.root!r}: {e}") from e
        except TypeError as e:  # an option the backend does not take
            raise ConfigError(f"CheckpointManager backend_options={dict(self.config.backend_options)!r}: {e}") from e
        self.store = RunStore(self.backend)
        self._codec = resolve_codec(self.config.compression, self.config.compression_level)
        self._progress = Progress(tracker_run_id=self.config.tracker_run_id, config=self.config.config)
        self._closed = False
        self._lock: RunLock | None = None
        # rank 0: the run's newest committed step; the foreground's own (a background save's
        # follow-up returns it, consumed by the next save(), wait() or close())
        self._last_step: int | None = None
        self._engine: Any = None  # async saves and SIGTERM handling (dist_ckpt.async_engine)
        self._tiers: Any = None  # with local_root: saves commit locally, promoted by the node's uploader
        if self.config.local_root is not None:
            from dist_ckpt.tiers.node import Tiers

            self._tiers = Tiers(
                self.config,
                self.backend.uri,
                rank=self.rank,
                world_size=self.world_size,
                process_group=self._pg,
                distributed=self._distributed,
            )
        self._save_backend = self._tiers.local if self._tiers is not None else self.backend
        self._agree(self._start if self.rank == 0 else None)
        if self._tiers is not None and not self.config.read_only:
            self._tiers.start()  # node leaders: local leftovers; adopt the queue a dead job left
        if self.config.async_save or self.config.save_on_sigterm:
            from dist_ckpt.async_engine import AsyncEngine

            self._engine = AsyncEngine(
                self.config,
                self._save_backend,
                self._codec,
                process_group=self._pg,
                rank=self.rank,
                world_size=self.world_size,
            )

    # -- collectives ------------------------------------------------------------------------
    def _agree(self, compute: Any) -> Any:
        """Run ``compute`` on rank 0 and hand its result (or its error) to every rank."""
        outcome: list[Any] = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                outcome = [("ok", compute() if compute is not None else None)]
            except Exception as e:  # any error must reach every rank, or they wait forever
                error = e
                shared = (
                    e if isinstance(e, CheckpointError) else CheckpointError(f"rank 0 failed: {type(e).__name__}: {e}")
                )
                outcome = [("err", shared)]
        if self._distributed:
            dist.broadcast_object_list(
                outcome, src=dist.get_global_rank(self._pg, 0) if self._pg else 0, group=self._pg
            )
        status, value = outcome[0]
        if status == "err":
            raise error if error is not None else value
        return value

    def _start(self) -> None:
        if self.config.read_only:
            return
        require_conditional_writes(
            self.backend, unsafe_single_writer=self.config.unsafe_single_writer, opt_in="unsafe_single_writer=True"
        )  # S3: probed once per bucket
        # The lock comes first: garbage collection must never touch another live job's saves.
        self._lock = RunLock(self.backend, self.config.lock_stale_after)
        self._lock.acquire()
        if self.config.collect_garbage_on_start and self._tiers is not None:  # spares promotions in flight
            self._tiers.collect_root_garbage(
                self.store, self.store.reconciled_manifest(self.config.best).pointers.get(mf.LAST)
            )
        elif self.config.collect_garbage_on_start:
            found = self.store.collect_garbage()
            if found.temp_dirs or found.uncommitted_steps or found.unfinished_uploads:
                log.warning("removed leftovers of interrupted saves in %s: %s", self.root, found)
        self._last_step = self.store.reconciled_manifest(self.config.best).pointers.get(mf.LAST)
        if self._tiers is not None:  # a local step newer than the root's counts too
            self._last_step = max(
                [s for s in (self._last_step, *self._tiers.local_steps()[-1:]) if s is not None], default=None
            )

    # -- public API -------------------------------------------------------------------------
    def track(self, **objects: Any) -> TrainingState:
        """Name the objects that make up the training state (models, optimizers, schedulers,
        scalers, data loaders — their position in the epoch —, Stateful samplers, dicts of counters)."""
        return TrainingState(objects, rank=self.rank, world_size=self.world_size)

    @property
    def best(self) -> Mapping[str, float]:
        """Best value so far of each tracked metric (restored on resume)."""
        return dict(self._progress.best)

    @property
    def epochs_without_improvement(self) -> Mapping[str, int]:
        """Per tracked metric: reports since it last improved (patience; restored on resume)."""
        return dict(self._progress.since_improvement)

    @property
    def tracker_run_id(self) -> str | None:
        return self._progress.tracker_run_id

    def save(
        self,
        step: int,
        state: TrainingState,
        *,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        force: bool = False,
    ) -> bool:
        """Report ``metrics`` for ``step`` and save the state if it is due (every
        ``save_every_n_steps``, when a tracked metric improves, or ``force``). Returns whether
        a checkpoint was written."""
        self._check_open()
        return save_step(self, step, state, metrics, epoch, force)

    def _decide(self, step: int, metrics: dict[str, float], epoch: int | None, force: bool) -> tuple[Progress, bool]:
        if self._lock is not None:
            self._lock.raise_if_lost()  # taken over (seen by the heartbeat thread): write nothing
        progress, improved = self._progress.observe(metrics, self.config.best)
        progress = replace(progress, step=step, epoch=epoch, metrics=metrics)
        every = self.config.save_every_n_steps
        due = bool(force or every is None or step % every == 0 or improved)
        if due and self._save_backend.exists(join_key(step_prefix(step), COMMITTED)):
            raise StepAlreadyExists(
                f"{self.root}: step {step} is already committed and is never overwritten. This happens "
                "after resuming from an earlier checkpoint than the run's last: continue such a branch "
                "in a new run root (restore(which=<checkpoint path>) from there), or prune the later steps."
            )
        # the save in flight counts too: its step is committed (or its failure raised) next
        in_flight = self._engine.in_flight_step() if self._engine is not None else None
        last_step = max((s for s in (self._last_step, in_flight) if s is not None), default=None)
        if due and last_step is not None and step < last_step:
            # Retention keeps the newest *step*: a checkpoint behind it could be deleted as soon
            # as it is committed, and "last" would still resume from the later step.
            raise ConfigError(
                f"{self.root}: step {step} is behind the run's last checkpoint (step {last_step}); a run's "
                "steps only go forward. This happens after resuming from an earlier checkpoint than the run's "
                "last: continue such a branch in a new run root (restore(which=<checkpoint path>) from there), "
                "or prune the later steps."
            )
        return progress, due

    def _commit_follow_up(self, step: int) -> CommitFollowUp:
        """Rank 0's follow-up of the commit of ``step`` (manifest update, retention), built from
        the manager's current values: the async worker runs it without touching the manager."""
        policy = RunPolicy(
            best_modes=dict(self.config.best),
            keep_last=self.config.keep_last,
            keep_every_n_steps=self.config.keep_every_n_steps,
            tracker_run_id=self._progress.tracker_run_id,
            config_hash=self.config.config_hash(),
        )
        fence = self._lock.fence if self._lock is not None else None  # a job that lost the run lock changes nothing
        return CommitFollowUp(self.store, step, policy, fence)

    def _committed(self, last_step: int | None) -> None:
        """A save's follow-up is done (foreground): the run's newest step is ``last_step``."""
        if last_step is not None:
            self._last_step = last_step

    def _manifest(self) -> mf.Manifest:
        return stored_manifest(self)

    def checkpoints(self) -> list[CheckpointInfo]:
        """The run's committed checkpoints, oldest first, with the pointers naming each."""
        return list_checkpoints(self)

    # -- resume (dist_ckpt/manager_restore.py) ----------------------------------------------
    def restore(self, state: TrainingState, which: Any = "last") -> ResumeInfo | None:
        """Restore every tracked object, the RNG states and the manager's bookkeeping from the
        checkpoint ``which`` names: ``"last"``, ``"best:<metric>"`` (any pointer the run's
        manifest has), a step number, ``"step_000001200"`` or the path/URI of a checkpoint.
        Returns None when ``which="last"`` and the run is new; a ``read_only`` manager raises
        :class:`CheckpointNotFound` instead (it never starts a run: the root is wrong)."""
        self._check_open()
        return restore_state(self, state, which)

    def load_weights(
        self, module: nn.Module, which: Any = "last", *, name: str | None = None, strict: bool = True
    ) -> LoadedWeights:
        """Load only a model's weights from a checkpoint (fresh start from trained weights:
        optimizer, schedulers, counters untouched). ``name`` is the name the model was tracked
        under; it may be omitted when the checkpoint holds one model.

        ``strict`` as in ``nn.Module.load_state_dict``: True requires the same keys
        (:class:`IncompatibleCheckpoint` names the missing and unexpected ones); False loads the
        tensors whose names match and leaves the rest of the module as it is. Shapes must agree
        either way. Returns :class:`LoadedWeights`: ``step`` (also ``int(result)``),
        ``missing_keys`` and ``unexpected_keys``."""
        self._check_open()
        return load_model_weights(self, module, which, name, strict)

    def start(self, state: TrainingState, args: Any) -> ResumeInfo | None:
        """Apply the flags ``dist_ckpt.add_checkpoint_args`` added (``--resume``, ``--init-from``,
        ``--list-checkpoints``); exits with status 2 on an invalid combination. See resume_flags."""
        from dist_ckpt.resume_flags import start

        return start(self, state, args)

    # -- lifecycle --------------------------------------------------------------------------
    def wait(self, persisted: bool = False) -> None:
        """Block until no save is in flight (a no-op for synchronous saves); raises the
        failure of a background save (on every rank). With ``local_root`` that is the local
        commit; ``persisted=True`` also waits until every promotion queued so far is committed
        at ``root`` (logging progress)."""
        self._check_open()
        if self._engine is not None:
            self._engine.drain()
        if persisted and self._tiers is not None:
            self._tiers.wait_persisted()

    def wait_staged(self) -> None:
        """Overlapped staging (``async_save=True``): block until the in-flight save's staging copy is done (the
        tracked optimizers' ``step()`` does this itself). Call it before changing parameters
        or optimizer state in place anywhere else; a no-op otherwise."""
        self._check_open()
        if self._engine is not None:
            self._engine.join_copy()

    def should_stop(self) -> bool:
        """With ``save_on_sigterm=True``: True on every rank once any rank received SIGTERM
        (a collective; call it on every rank, e.g. once per step). Then save the current step
        with ``force=True`` and call :meth:`exit_after_preemption`. Always False otherwise."""
        self._check_open()
        return self._engine.should_stop() if self._engine is not None else False

    def exit_after_preemption(self, code: int = EXIT_CODE) -> None:
        """Wait for the in-flight save, close the manager and exit with ``code`` (143: 128+SIGTERM)."""
        self.close()
        raise SystemExit(code)

    def close(self, wait_for_upload: bool = True) -> None:
        """Wait for the in-flight save and release the run. With ``local_root``, also wait
        until the queued promotions are committed at ``root`` (progress logged), unless
        ``wait_for_upload=False``: the node's uploader finishes them after this job is gone."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._engine is not None:
                self._engine.close()  # waits for the in-flight save; raises its failure after cleaning up
            if self._distributed:
                settle_sends(self._pg)  # rank 0's last decision send (dist_ckpt.decision)
            if self._tiers is not None and wait_for_upload and not self.config.read_only:
                self._tiers.wait_persisted()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            release_codec_buffers()  # the zstd codec's idle scratch buffers

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this CheckpointManager is closed; create a new one")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
