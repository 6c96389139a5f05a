"""Hugging Face ``transformers.Trainer`` checkpoints through dist_ckpt (extra ``dist-ckpt[hf]``).

``DistCkptTrainer`` is a ``Trainer`` that saves its checkpoints as dist_ckpt checkpoints of a
run root — local, NFS or ``s3://`` — and resumes from them with the ``train`` call Trainer users
already write::

    trainer = DistCkptTrainer(model=model, args=args, train_dataset=ds,
                              checkpoint_root="s3://bucket/runs/exp1",        # default: args.output_dir
                              checkpoint_options={"compression": "zstd", "async_save": True})
    trainer.train(resume_from_checkpoint=True)   # the run's latest checkpoint (error if none)
    # also: a step (1200), "best:eval_loss", a checkpoint path/URI, or another run root (its latest)

Why a Trainer subclass: Trainer writes its checkpoints itself (``_save_checkpoint``: local
``checkpoint-N/`` folders of ``torch.save`` files) and reads them back from local paths at
resume; a ``TrainerCallback``'s ``on_save`` only runs after those files are written and no
callback runs where the resume state is read, and Trainer never calls Accelerate's
``save_state``, so its hooks never fire. Overriding the checkpoint I/O methods keeps everything
else of Trainer — when to save (``save_strategy``/``save_steps``), ``save_total_limit`` (our
``keep_last``), ``metric_for_best_model`` (a ``best:`` pointer), and above all its exact-resume
logic: the ``TrainerState`` is handed back to Trainer as a ``trainer_state.json`` in a scratch
folder, so Trainer itself skips the batches already trained on and re-seeds at the same moment
it would. ``DistCkptMixin`` gives the same to another ``Trainer`` subclass
(``class MyTrainer(DistCkptMixin, SFTTrainer)``).

What a checkpoint holds: the model (``model_wrapped``: plain, DDP or FSDP2), the optimizer
(unwrapped from Accelerate), the LR scheduler, ``TrainerState`` (JSON, with the stateful
callbacks), and every rank's RNG states. Pinned to transformers 5.24 (the private methods
overridden here). Not covered: ``load_best_model_at_end`` (refused; use
``CheckpointManager(root, read_only=True).load_weights(model, which="best:eval_loss")``),
DeepSpeed, GradScaler state (AMP on GPU), ``push_to_hub`` of checkpoints, ``save_only_model``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from dist_ckpt import rng
from dist_ckpt.errors import CheckpointNotFound, ConfigError
from dist_ckpt.manager import CheckpointManager
from dist_ckpt.manager_restore import _target
from dist_ckpt.progress import Progress
from dist_ckpt.state import TrainingState

TRAINER_STATE = "trainer_state.json"  # the file name Trainer reads its state from
_VALUES = "trainer"  # the tracked dict holding TrainerState as JSON


class DistCkptMixin:
    """Trainer checkpoint I/O through a :class:`CheckpointManager` (see the module docstring).

    ``checkpoint_root``: the run root (default ``args.output_dir``); ``checkpoint_options``:
    keyword options of :class:`CheckpointManager` (``compression``, ``async_save``,
    ``keep_every_n_steps``, ...). ``keep_last`` defaults to ``args.save_total_limit`` and
    ``best`` to ``{args.metric_for_best_model: "max"|"min"}``."""

    def __init__(
        self,
        *args: Any,
        checkpoint_root: str | None = None,
        checkpoint_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        targs = self.args  # type: ignore[attr-defined]
        if targs.load_best_model_at_end:
            raise ConfigError(
                "DistCkptTrainer: load_best_model_at_end is not supported; after train() load the best weights with "
                "CheckpointManager(checkpoint_root, read_only=True).load_weights(model, which='best:<metric>')"
            )
        self.checkpoint_root = str(checkpoint_root or targs.output_dir)
        self.checkpoint_options = dict(checkpoint_options or {})
        self._mgr: CheckpointManager | None = None
        self._values: dict[str, str] = {"trainer_state": "{}"}
        self._stub: str | None = None  # the scratch folder Trainer resumes "from"
        self._resume_uri: str | None = None
        self._resumed_rng: dict[str, Any] | None = None

    # -- the manager --------------------------------------------------------------------------
    def _best_metric(self) -> str | None:
        metric = self.args.metric_for_best_model  # type: ignore[attr-defined]
        if not metric:
            return None
        return metric if metric.startswith("eval_") else f"eval_{metric}"

    def _manager(self) -> CheckpointManager:
        if self._mgr is None:
            options = dict(self.checkpoint_options)
            options.setdefault("keep_last", self.args.save_total_limit)  # type: ignore[attr-defined]
            metric = self._best_metric()
            if metric is not None:
                options.setdefault("best", {metric: "max" if self.args.greater_is_better else "min"})  # type: ignore[attr-defined]
            self._mgr = CheckpointManager(self.checkpoint_root, **options)
        return self._mgr

    def _tracked(self) -> TrainingState:
        objects: dict[str, Any] = {"model": self.model_wrapped}  # type: ignore[attr-defined]
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            objects["optimizer"] = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds it
        if getattr(self, "lr_scheduler", None) is not None:
            objects["lr_scheduler"] = self.lr_scheduler  # type: ignore[attr-defined]
        objects[_VALUES] = self._values
        return self._manager().track(**objects)

    # -- save -----------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state = self.state  # type: ignore[attr-defined]
        if self.hp_search_backend is None and trial is None:  # type: ignore[attr-defined]
            self.store_flos()  # type: ignore[attr-defined]
        # as Trainer does: stateful callbacks (early stopping, ...) and TrainerControl into the state
        for cb in [*self.callback_handler.callbacks, self.control]:  # type: ignore[attr-defined]
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(cb.state())
                else:
                    state.stateful_callbacks[name] = cb.state()
        self._values["trainer_state"] = json.dumps(dataclasses.asdict(state), sort_keys=True)
        metrics = {}
        metric = self._best_metric()
        if metric is not None:
            for entry in reversed(state.log_history):
                if entry.get("step") == state.global_step and metric in entry:
                    metrics[metric] = float(entry[metric])
                    break
        epoch = None if state.epoch is None else int(math.floor(state.epoch))
        # Trainer decided this step is saved (save_strategy): force it
        self._manager().save(state.global_step, self._tracked(), metrics=metrics, epoch=epoch, force=True)

    # -- resume ---------------------------------------------------------------------------------
    def _which(self, resume: Any) -> Any:
        """``resume_from_checkpoint`` as ``restore(which=...)`` takes it."""
        if resume is True:
            return "last"
        if isinstance(resume, int) or not isinstance(resume, str):
            return resume
        if resume.rstrip("/") == self.checkpoint_root.rstrip("/"):
            return "last"
        if "/" in resume or os.path.isdir(resume):
            from dist_ckpt.checkpoint_view import locate

            kind, backend, prefix = locate(resume)
            if kind == "run":  # another run root: its latest checkpoint
                from dist_ckpt.run_store import RunStore, step_prefix

                entries = RunStore(backend).committed_entries()
                if not entries:
                    raise CheckpointNotFound(f"resume_from_checkpoint={resume!r}: that run has no committed checkpoint")
                return f"{backend.uri}/{step_prefix(entries[-1].step)}"
            return f"{backend.uri}/{prefix}"
        return resume  # "last", "best:<metric>", "step_000001200"

    def _prepare_resume(self, resume: Any) -> str:
        """Find the checkpoint, write its TrainerState where Trainer reads it, return that folder."""
        which = self._which(resume)
        mgr = self._manager()
        target = _target(mgr, which)
        if target is None:
            raise CheckpointNotFound(
                f"resume_from_checkpoint={resume!r}: {self.checkpoint_root} has no committed checkpoint"
            )
        backend, prefix = target
        from dist_ckpt.checkpoint_view import CheckpointView

        view = CheckpointView(backend, prefix)
        progress = view.progress() or Progress()
        values = progress.values.get(_VALUES)
        if not isinstance(values, dict) or "trainer_state" not in values:
            raise ConfigError(
                f"{view.uri} was not saved by DistCkptTrainer (no TrainerState in it); load its "
                "weights with CheckpointManager.load_weights instead"
            )
        stub = tempfile.mkdtemp(prefix="dist-ckpt-resume-")
        with open(os.path.join(stub, TRAINER_STATE), "w", encoding="utf-8") as f:
            f.write(values["trainer_state"])
        self._stub, self._resume_uri = stub, view.uri
        return stub

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint``: True (the latest checkpoint of
        ``checkpoint_root``), a step, ``"last"``, ``"best:<metric>"``, or the path/URI of a
        checkpoint or of a run root."""
        try:
            stub = None if resume_from_checkpoint in (None, False) else self._prepare_resume(resume_from_checkpoint)
            return super().train(stub, *args, **kwargs)  # type: ignore[misc]
        finally:
            if self._stub is not None:
                shutil.rmtree(self._stub, ignore_errors=True)
            self._stub = self._resume_uri = self._resumed_rng = None
            if self._mgr is not None:
                mgr, self._mgr = self._mgr, None
                mgr.close()  # waits for an async save in flight, releases the run lock

    def _ours(self, checkpoint: Any) -> bool:
        return checkpoint is not None and checkpoint == self._stub

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._ours(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        # the weights are restored with the optimizer, once it exists (_load_optimizer_and_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._ours(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        self._manager().restore(self._tracked(), which=self._resume_uri)
        # restore() set the RNG to the checkpoint's; Trainer sets it again where it would load
        # rng_state.pth (after skipping the trained batches), so keep it for _load_rng_state
        self._resumed_rng = rng.capture()

    def _load_scaler(self, checkpoint: str | None) -> None:
        if not self._ours(checkpoint):
            return super()._load_scaler(checkpoint)  # type: ignore[misc]

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if not self._ours(checkpoint):
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]
        if self._resumed_rng is not None:
            rng.apply(self._resumed_rng)


class DistCkptTrainer(DistCkptMixin, Trainer):
    """``transformers.Trainer`` with dist_ckpt checkpoints; see :mod:`dist_ckpt.integrations.hf`."""
