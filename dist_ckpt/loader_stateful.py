"""Tracking torchdata's ``StatefulDataLoader`` (or any ``DataLoader`` with
``state_dict()``/``load_state_dict()``).

Its own ``state_dict()`` knows the position in the epoch, the sampler's state and, with
workers, the base seed and worker states. Three things it leaves to the caller, done here:

- **per rank**: each rank's state is its own (base seeds differ by rank); stored under
  ``rank_<r>`` so no rank's state is taken for another's;
- **JSON**: the state is stored as one tagged-JSON value (generator states, which it returns
  as tensors, become arrays), never pickle;
- **the global RNG**: the first ``iter()`` after ``load_state_dict()`` still draws a base seed
  from the global generator before it applies the saved one, which would shift the RNG that
  ``restore()`` just put back; that draw is made from a scratch generator instead. The
  loader's own ``generator=``, when given, is saved and restored too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_ckpt.data_position import decode_state, encode_state
from dist_ckpt.format import json_values

log = logging.getLogger(__name__)

_ATTR = "_dist_ckpt_stateful"
_TENSOR = "__dist_ckpt_tensor"


def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {_TENSOR: value.detach().cpu().numpy()}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR} and isinstance(value[_TENSOR], np.ndarray):
            return torch.from_numpy(value[_TENSOR].copy())
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_plain(v) for v in value)
    return value


_CLASSES: dict[type, type] = {}


def _tracked_class(cls: type) -> type:
    if cls not in _CLASSES:

        class Tracked(cls):  # type: ignore[valid-type, misc]
            def __iter__(self) -> Any:
                if getattr(self, "next_iter_state", None) is None:
                    return super().__iter__()
                saved = self.generator
                self.generator = torch.Generator()  # the base seed drawn here is replaced by the saved one
                try:
                    return super().__iter__()
                finally:
                    self.generator = saved

        Tracked.__name__ = Tracked.__qualname__ = f"Tracked{cls.__name__}"
        _CLASSES[cls] = Tracked
    return _CLASSES[cls]


class StatefulLoaderPosition:
    """The tracked form of a loader that has its own ``state_dict()``."""

    def __init__(self, loader: DataLoader, name: str, rank: int, world_size: int):
        self.loader, self.name, self.rank, self.world = loader, name, rank, world_size
        loader.__class__ = _tracked_class(type(loader))
        setattr(loader, _ATTR, self)

    def state_dict(self) -> dict[str, str]:
        doc: dict[str, Any] = {"world": self.world, "generator": None, "state": None}
        if self.loader.generator is not None:
            doc["generator"] = encode_state(self.loader.generator.get_state())
        # Before the first iter() the loader would build an iterator (drawing a base seed) just
        # to report its initial state: there is no position to save yet.
        if getattr(self.loader, "_iterator", None) is not None or getattr(self.loader, "next_iter_state", None):
            doc["state"] = _to_plain(self.loader.state_dict())
        return {f"rank_{self.rank}": json.dumps(json_values.to_json(doc, self.name))}

    def load_template(self, stored: Collection[str]) -> dict[str, str]:
        key = f"rank_{self.rank}"
        return {key: ""} if f"{self.name}.{key}" in stored else {}

    def load_state_dict(self, state: dict[str, str]) -> None:
        text = state.get(f"rank_{self.rank}")
        if text is None:
            log.warning(
                "%s: the checkpoint holds no state of this loader for rank %d; its epoch starts from the beginning",
                self.name,
                self.rank,
            )
            return
        doc = json_values.decode(text.encode("utf-8"), f"{self.name}.rank_{self.rank}")
        if doc["world"] != self.world:
            if self.rank == 0:
                log.warning(
                    "%s: saved by %d ranks, restored on %d: a StatefulDataLoader's position belongs to its rank's "
                    "share of the data, so the interrupted epoch starts from the beginning on every rank "
                    "(a plain DataLoader with a DistributedSampler continues it instead)",
                    self.name,
                    doc["world"],
                    self.world,
                )
            return
        if doc["generator"] is not None and self.loader.generator is not None:
            self.loader.generator.set_state(decode_state(doc["generator"]))
        if doc["state"] is not None:
            self.loader.load_state_dict(_from_plain(doc["state"]))
