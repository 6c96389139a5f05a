"""What an importer hands to the writer: the full tensors and values of one checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ImportedState:
    """One source checkpoint, read: ``entries`` maps each flat key (``model.layer.weight``,
    ``optim.state.layer.weight.exp_avg``: the keys a tracked state's ``state_dict`` flattens
    to) to a full CPU tensor or a plain value; ``objects`` names the top-level objects and
    their kind (``model``, ``optimizer``, ``stateful``), as a manager's checkpoint records them."""

    source: str
    format: str
    entries: Mapping[str, Any]
    objects: Mapping[str, str]

    @property
    def tensor_count(self) -> int:
        return sum(isinstance(v, torch.Tensor) for v in self.entries.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.entries.values() if isinstance(v, torch.Tensor))


def guess_objects(keys: list[str], is_tensor: Mapping[str, bool]) -> dict[str, str]:
    """The kind of each top-level name: an optimizer when it holds ``state`` and
    ``param_groups`` (``get_optimizer_state_dict``'s layout), a model when it holds only
    tensors, else something with a ``state_dict()`` (scheduler, counters)."""
    children: dict[str, set[str]] = {}
    only_tensors: dict[str, bool] = {}
    for key in keys:
        top, _, rest = key.partition(".")
        children.setdefault(top, set()).add(rest.partition(".")[0])
        only_tensors[top] = only_tensors.get(top, True) and is_tensor[key]
    kinds = {}
    for top, below in children.items():
        if {"state", "param_groups"} <= below:
            kinds[top] = "optimizer"
        elif only_tensors[top]:
            kinds[top] = "model"
        else:
            kinds[top] = "stateful"
    return kinds


def prefixed(entries: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """``entries`` with every key under ``name`` (``--name``), or as they are."""
    return dict(entries) if not name else {f"{name}.{k}": v for k, v in entries.items()}
