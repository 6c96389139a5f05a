"""Capture and restore of the named objects of a training job as one DCP state dict.

Models (plain, DDP, FSDP2) and optimizers go through
``torch.distributed.checkpoint.state_dict`` (FQN-keyed, resharding-friendly); each optimizer
is paired with the tracked model(s) whose parameters it updates. LR schedulers,
``GradScaler``, Stateful dataloaders/samplers and anything else with
``state_dict()``/``load_state_dict()`` go through those methods. Plain ``dict`` objects
(counters, the user's bookkeeping) are saved as values and restored in place.

All objects are saved in one checkpoint and restored from one: a GAN's generator,
discriminator, both optimizers and both schedulers always come from the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dist_ckpt.errors import ConfigError
from dist_ckpt.loaders import TrackedLoader, is_loader, track_loader

RESERVED = ("_dist_ckpt", "rng")


@dataclass(frozen=True)
class _OptimizerBinding:
    optimizer: torch.optim.Optimizer
    module: nn.Module  # the model, or a ModuleDict of the models its parameters belong to


def _kind(obj: Any) -> str:
    if is_loader(obj):  # before "stateful": a StatefulDataLoader's state is per rank
        return "loader"
    if isinstance(obj, nn.Module):
        return "model"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if type(obj) is dict:
        return "values"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    return "unsupported"


class TrainingState:
    """The tracked objects of a job, by name. Built by ``CheckpointManager.track``."""

    def __init__(self, objects: dict[str, Any], *, rank: int = 0, world_size: int = 1):
        if not objects:
            raise ConfigError("track() needs at least one named object, e.g. track(model=model, optimizer=opt)")
        for name, obj in objects.items():
            if name in RESERVED or "." in name or not name:
                raise ConfigError(f"track({name}=...): the name {name!r} is reserved or contains '.'; choose another")
            if _kind(obj) == "unsupported":
                raise ConfigError(
                    f"track({name}=...): a {type(obj).__qualname__} has no state_dict()/load_state_dict(); "
                    "track models, optimizers, schedulers, GradScalers, Stateful loaders/samplers, or a dict of values"
                )
        self.objects = dict(objects)
        self.kinds = {name: _kind(obj) for name, obj in objects.items()}
        self._bindings = {
            name: self._bind(name, obj) for name, obj in objects.items() if self.kinds[name] == "optimizer"
        }
        self.loaders: dict[str, TrackedLoader] = {
            name: track_loader(obj, name, rank, world_size)
            for name, obj in objects.items()
            if self.kinds[name] == "loader"
        }

    def _bind(self, name: str, optimizer: torch.optim.Optimizer) -> _OptimizerBinding:
        param_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        owners = {
            model_name: model
            for model_name, model in self.objects.items()
            if self.kinds[model_name] == "model" and param_ids & {id(p) for p in model.parameters()}
        }
        covered = set().union(*({id(p) for p in m.parameters()} for m in owners.values())) if owners else set()
        if not owners or not param_ids <= covered:
            raise ConfigError(
                f"track({name}=...): the optimizer updates parameters of no tracked model (or of one not tracked); "
                "track every model whose parameters it updates, e.g. track(model=model, optimizer=opt)"
            )
        if len(owners) == 1:
            return _OptimizerBinding(optimizer, next(iter(owners.values())))
        return _OptimizerBinding(optimizer, nn.ModuleDict(owners))

    @property
    def models(self) -> dict[str, nn.Module]:
        return {n: o for n, o in self.objects.items() if self.kinds[n] == "model"}

    def state_dict(self) -> dict[str, Any]:
        """Current state of every object (tensors shared with the live objects, not copied)."""
        out: dict[str, Any] = {}
        for name, obj in self.objects.items():
            kind = self.kinds[name]
            if kind == "model":
                out[name] = get_model_state_dict(obj)
            elif kind == "optimizer":
                binding = self._bindings[name]
                out[name] = get_optimizer_state_dict(binding.module, binding.optimizer)
            elif kind == "stateful":
                out[name] = obj.state_dict()
            elif kind == "loader":
                out[name] = self.loaders[name].state_dict()
            # "values" dicts travel as one JSON value in the manager's progress record
            # (their keys may change between runs, which a DCP template could not follow).
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a state dict produced by :meth:`state_dict` (after a load) to the objects."""
        for name, obj in self.objects.items():
            kind, sd = self.kinds[name], state.get(name)
            if sd is None and kind == "values":
                continue
            if kind == "model":
                set_model_state_dict(obj, sd)
            elif kind == "optimizer":
                binding = self._bindings[name]
                set_optimizer_state_dict(binding.module, binding.optimizer, sd)
            elif kind == "values":
                obj.clear()
                obj.update(sd)
            elif kind == "loader":
                self.loaders[name].load_state_dict(sd or {})
            elif sd or obj.state_dict():  # a disabled GradScaler saves {} and refuses to load it
                obj.load_state_dict(sd)

    def load_template(self, stored: Any) -> dict[str, Any]:
        """:meth:`state_dict` shaped for loading the checkpoint whose keys are ``stored``
        (a loader may need other ranks' positions after a world-size change)."""
        out = self.state_dict()
        for name, tracked in self.loaders.items():
            out[name] = tracked.load_template(stored)
        return out

    def describe(self) -> dict[str, str]:
        """``{name: kind}``, stored in the checkpoint so tools know which entries are models."""
        return dict(self.kinds)
