"""Lightning: save and resume ``Trainer.fit`` through dist_ckpt.

    from dist_ckpt.integrations.lightning import DistCkptIO, DistCkptModelCheckpoint

    trainer = Trainer(
        plugins=[DistCkptIO(async_save=True, compression="zstd")],
        callbacks=[DistCkptModelCheckpoint(dirpath="s3://bucket/runs/exp1", save_last=True,
                                           save_top_k=3, monitor="val_loss")],
    )
    trainer.fit(model, ckpt_path="last")     # resumes the newest committed checkpoint, if any

:class:`DistCkptIO` is Lightning's ``CheckpointIO`` seam: Lightning's checkpoint dict is
stored as a dist_ckpt checkpoint (safetensors shards, optional zstd, JSON for everything that
is not a tensor — never pickle) of the run ``dirpath``, as the step ``global_step`` (see
:mod:`dist_ckpt.integrations.lightning_run`). With ``async_save=True``, ``save_checkpoint``
returns once the tensors are copied into a reused staging buffer; writing, commit, the
manifest update and retention run on one background thread, one save at a time (the next
save waits for the previous one). A background failure is raised at the next
``save_checkpoint`` or at ``teardown()`` (the end of ``fit``), as Lightning's
``AsyncCheckpointIO`` does.

:class:`DistCkptModelCheckpoint` is ``ModelCheckpoint`` with the same arguments, for such a
run: ``last`` and ``best:<monitor>`` are manifest pointers (no ``last.ckpt`` copy, no
symlink: local, NFS and S3 alike), ``dirpath`` may be ``s3://`` (no fsspec/s3fs needed),
and ``trainer.fit(ckpt_path="last")`` finds the newest committed checkpoint.

Strategies: those that hand the checkpoint to ``CheckpointIO`` on global rank 0 (single
device, DDP and its spawn/subprocess variants). Lightning's ``FSDPStrategy`` requires a GPU
accelerator and writes sharded checkpoints without ``CheckpointIO``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from weakref import proxy

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from fsspec.spec import AbstractFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from dist_ckpt.api import resolve_codec, run_dcp
from dist_ckpt.errors import CheckpointError, ConfigError, StorageError
from dist_ckpt.integrations.lightning_run import (
    LAST_NAME,
    PROTOCOL,
    RunWriter,
    last_step,
    parse_path,
    resolve_step,
)
from dist_ckpt.integrations.lightning_state import join_checkpoint, load_template, split_checkpoint
from dist_ckpt.planner import JsonLoadPlanner
from dist_ckpt.run_store import RunStore, step_prefix
from dist_ckpt.staging import Stager, describe
from dist_ckpt.storage_reader import DistCkptReader
from storage_backends import Backend, open_backend

log = logging.getLogger(__name__)

__all__ = ["DistCkptIO", "DistCkptModelCheckpoint", "SaveOptions"]


@dataclass(frozen=True)
class SaveOptions:
    """``storage_options`` of a save: the monitored metrics recorded with the checkpoint and
    their modes (``{"val_loss": "min"}``), which make the manifest's ``best:<metric>`` pointers."""

    metrics: Mapping[str, float] = field(default_factory=dict)
    best_modes: Mapping[str, str] = field(default_factory=dict)
    retires: tuple[str, ...] = ()  # checkpoint names this save replaces (deleted once it commits)


class DistCkptIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing dist_ckpt checkpoints (see the module docstring).

    ``compression``: ``"zstd"`` or ``"none"``; ``backend_options``: passed to the storage
    backend (e.g. an S3 ``endpoint_url``); ``lock_stale_after``: the run lock's lease (s);
    ``backend_factory``: opens the backend of a run root instead (a wrapper, a preconfigured
    client), as ``CheckpointManager(backend=...)``; ``unsafe_single_writer``: as the manager's
    option, for an S3 server that ignores conditional writes (README, "S3 servers")."""

    def __init__(
        self,
        async_save: bool = True,
        compression: str = "zstd",
        *,
        compression_level: int = 1,
        lock_stale_after: float = 600.0,
        backend_options: Mapping[str, Any] | None = None,
        backend_factory: Callable[[str], Backend] | None = None,
        unsafe_single_writer: bool = False,
    ):
        super().__init__()
        self.async_save = bool(async_save)
        self._codec = resolve_codec(compression, compression_level)
        self.lock_stale_after = float(lock_stale_after)
        self.backend_options = dict(backend_options or {})
        self.backend_factory = backend_factory
        self.unsafe_single_writer = bool(unsafe_single_writer)
        self._writers: dict[str, RunWriter] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stager = Stager()
        self._save: Future[None] | None = None  # the save in flight (one at a time: the buffer is reused)
        self._jobs: list[Future[None]] = []  # saves and removals not yet checked for errors
        self._submitted: dict[str, set[int]] = {}  # root → steps saved or being saved by this process

    # -- Lightning's CheckpointIO ----------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._raise_finished_failures()
        where = parse_path(path)
        options = _options(storage_options)
        try:
            step = int(checkpoint["global_step"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where.uri}: the Lightning checkpoint has no integer 'global_step' ({e})") from e
        name = None if LAST_NAME.match(where.name) else where.name
        saved = self._submitted.setdefault(where.root, set())
        if name is None and step in saved:
            return  # "last" is the manifest pointer to the newest committed step: nothing to write
        flat = split_checkpoint(checkpoint)  # UnsupportedValue naming the key, before anything is written
        self._wait_for_save()  # one save in flight: the staging buffer is reused
        writer = self._writer(where.root)
        if writer.has_step(step):
            if name is not None:
                log.warning(
                    "%s: step %d is committed already (under %r); %r is not written again — a committed "
                    "step is never overwritten",
                    where.uri,
                    step,
                    writer.names.get(step),
                    name,
                )
            saved.add(step)
            return
        kwargs = {
            "epoch": _int_or_none(checkpoint.get("epoch")),
            "metrics": dict(options.metrics),
            "best_modes": dict(options.best_modes),
            "retires": tuple(options.retires),
        }
        saved.add(step)
        if not self.async_save:
            writer.commit(step, name, flat, **kwargs)
            return
        snapshot = self._stager.stage(describe(flat))  # the stall: a copy into the reused buffer
        self._save = self._submit(writer.commit, step, name, snapshot.flat_state_dict(), **kwargs)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint of a run: ``<dirpath>/<name>.ckpt`` (a name it was saved under),
        ``<dirpath>/last.ckpt`` (the newest committed step) or ``<dirpath>/step_000000300``.
        Nothing is unpickled, whatever ``weights_only`` says."""
        where = parse_path(path)
        if where.root in self._writers:
            self._wait_for_save()  # our own save of this run may be what "last" should name
        backend = self._backend(where.root)
        step = resolve_step(backend, where.name)
        reader = DistCkptReader(backend, step_prefix(step))
        uri = f"{where.root}/{step_prefix(step)}"
        template = load_template(reader.read_metadata(), uri)
        run_dcp(dcp.load, template, storage_reader=reader, planner=JsonLoadPlanner(), no_dist=True)
        checkpoint = join_checkpoint(template, uri)
        if isinstance(map_location, (str, torch.device)):
            checkpoint = _to_device(checkpoint, torch.device(map_location))
        log.info("loaded %s (step %d) for %s", uri, step, where.uri)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Retention: runs after the save in flight, on the background thread."""
        self._raise_finished_failures()
        where = parse_path(path)
        writer = self._writer(where.root)
        if self.async_save:
            self._submit(writer.remove, where.name)
        else:
            writer.remove(where.name)

    def teardown(self) -> None:
        """Wait for the saves in flight, release the run locks; raise a background failure."""
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._raise_finished_failures()
        finally:
            self._save = None
            self._submitted.clear()
            writers, self._writers = self._writers, {}
            for writer in writers.values():
                writer.close()

    # -- internals ---------------------------------------------------------------------------
    def _backend(self, root: str) -> Backend:
        if self.backend_factory is not None:
            return self.backend_factory(root)
        try:
            return open_backend(root, **self.backend_options)
        except ValueError as e:
            raise ConfigError(f"DistCkptIO: cannot open {root!r}: {e}") from e

    def _writer(self, root: str) -> RunWriter:
        writer = self._writers.get(root)
        if writer is None:
            writer = RunWriter(
                self._backend(root),
                self._codec,
                lock_stale_after=self.lock_stale_after,
                unsafe_single_writer=self.unsafe_single_writer,
            )
            self._writers[root] = writer
        return writer

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[None]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_ckpt-lightning")
        future = self._executor.submit(fn, *args, **kwargs)
        self._jobs.append(future)
        return future

    def _wait_for_save(self) -> None:
        if self._save is not None:
            self._save.exception()  # waits; the failure itself is raised just below
            self._save = None
        self._raise_finished_failures()

    def _raise_finished_failures(self) -> None:
        done = [f for f in self._jobs if f.done()]
        self._jobs = [f for f in self._jobs if not f.done()]
        for future in done:
            error = future.exception()
            if error is None:
                continue
            if isinstance(error, CheckpointError):
                raise error
            raise StorageError(
                f"a background checkpoint save or removal failed: {type(error).__name__}: {error}"
            ) from error


def _options(storage_options: Any) -> SaveOptions:
    if storage_options is None:
        return SaveOptions()
    if isinstance(storage_options, SaveOptions):
        return storage_options
    raise ConfigError(
        f"DistCkptIO: storage_options={storage_options!r}: expected None or "
        "dist_ckpt.integrations.lightning.SaveOptions(metrics=..., best_modes=...)"
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _plugin_of(trainer: Any) -> Any:
    io = trainer.strategy.checkpoint_io
    while isinstance(io, _WrappingCheckpointIO):
        io = io.checkpoint_io
    return io


class DistCkptModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for runs written by :class:`DistCkptIO` (same arguments).

    ``save_last=True`` (or ``"link"``) keeps ``last`` as the manifest pointer to the newest
    committed step — ``last.ckpt`` is a name, never a file; top-k checkpoints are recorded
    with the monitored value, so ``best:<monitor>`` names the best one; names are labels, not
    files: a name saved again replaces the older step (no ``-v1`` versions)."""

    def __init__(self, dirpath: Any = None, *args: Any, **kwargs: Any):
        remote = dirpath is not None and "://" in str(dirpath)
        super().__init__(None if remote else dirpath, *args, **kwargs)  # fsspec is never asked about s3://
        if remote:
            self.dirpath = str(dirpath).rstrip("/")
        if self.save_last == "link":
            self.save_last = True  # a pointer already: no symlink
        self._score: Any = None  # the monitored value of the top-k save in progress
        self._retiring: str | None = None  # the checkpoint the top-k save in progress replaces

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not isinstance(_plugin_of(trainer), DistCkptIO):
            raise ConfigError(
                "DistCkptModelCheckpoint needs Trainer(plugins=[DistCkptIO(...)]): its checkpoints are "
                f"dist_ckpt runs; the trainer's CheckpointIO is {type(trainer.strategy.checkpoint_io).__name__}"
            )
        self.dirpath = trainer.strategy.broadcast(self._dirpath(trainer))

    def _dirpath(self, trainer: Any) -> str:
        return str(self.dirpath if self.dirpath is not None else self._ModelCheckpoint__resolve_ckpt_dir(trainer))

    def file_exists(self, filepath: Any, trainer: Any) -> bool:
        return False  # a name saved again replaces the older step (lightning_run's retention)

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        dirpath = self._dirpath(trainer)
        plugin = _plugin_of(trainer)
        root = parse_path(f"{dirpath}/last.ckpt").root
        if isinstance(plugin, DistCkptIO):
            _OPENERS[root] = plugin._backend  # the Trainer's fsspec check below opens it the same way
        backend = _OPENERS.get(root, open_backend)(root)
        return {f"{PROTOCOL}://{dirpath}/last.ckpt"} if last_step(backend) is not None else set()

    def _update_best_and_save(self, current: Any, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        self._score = float("inf" if self.mode == "min" else "-inf") if torch.isnan(current) else float(current)
        k = self.save_top_k
        # the path ModelCheckpoint will remove right after this save (as it computes it)
        self._retiring = self.kth_best_model_path if k > 0 and len(self.best_k_models) == k else None
        try:
            super()._update_best_and_save(current, trainer, monitor_candidates)
        finally:
            self._score = self._retiring = None

    def _save_none_monitor_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        self._retiring = self.best_model_path if self.save_top_k == 1 and self.best_model_path else None
        try:
            super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        finally:
            self._retiring = None

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        metrics = {self.monitor: self._score} if self._score is not None and self.monitor else {}
        retires: tuple[str, ...] = ()
        if (
            self._retiring
            and self._retiring != filepath
            and parse_path(self._retiring).root == parse_path(filepath).root
        ):
            retires = (parse_path(self._retiring).name,)
        options = SaveOptions(metrics=metrics, best_modes={m: self.mode for m in metrics}, retires=retires)
        trainer.save_checkpoint(filepath, self.save_weights_only, storage_options=options)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


_OPENERS: dict[str, Callable[[str], Backend]] = {}  # run root → how its DistCkptIO opens it


class _PointerFileSystem(AbstractFileSystem):
    """What ``trainer.fit(ckpt_path="last")`` asks of the path ModelCheckpoint offers
    (``distckpt://<dirpath>/last.ckpt``): Lightning checks it with fsspec (``exists``,
    ``modified``) before handing it to ``CheckpointIO.load_checkpoint``. Answered from the
    run's COMMITTED markers, so no s3fs is needed and an uncommitted save never counts."""

    protocol = PROTOCOL

    def _last(self, path: str) -> tuple[Backend, int | None]:
        where = parse_path(path)
        backend = _OPENERS.get(where.root, open_backend)(where.root)
        return backend, last_step(backend) if LAST_NAME.match(where.name) else None

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._last(path)[1] is not None

    def modified(self, path: str) -> datetime.datetime:
        backend, step = self._last(path)
        entry = next((e for e in RunStore(backend).committed_entries() if e.step == step), None)
        stamp = entry.time if entry is not None else 0.0
        return datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc)


fsspec.register_implementation(PROTOCOL, _PointerFileSystem, clobber=True)
