"""Import a ``torch.save`` file holding a model's state dict.

Read with ``torch.load(weights_only=True)``: tensors and plain containers only, anything
else is refused by torch's own restricted unpickler. The file (or its ``key`` entry, for the
common ``{"model": state_dict, "epoch": ...}`` files) must map parameter names to tensors; it
is imported under ``name`` (``model.<key>``), where ``mgr.track(model=...)`` finds it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.importers.source import ImportedState

_SHOW = 8


def _describe(obj: Mapping[Any, Any]) -> str:
    shown = [f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:_SHOW]]
    return ", ".join(shown) + (f" (+{len(obj) - _SHOW} more)" if len(obj) > _SHOW else "")


def read_torch_file(path: str, name: str, key: str | None = None) -> ImportedState:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read it ({e.strerror or e})") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"{path}: refused or unreadable by torch.load(weights_only=True) — only tensors and plain containers "
            f"are loaded, never arbitrary objects: {e}"
        ) from e
    where = path
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                found = _describe(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise ConfigError(f"{where}: has no entry {part!r} (--key {key}); it holds {found}")
            obj, where = obj[part], f"{where}[{part!r}]"
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: holds a {type(obj).__name__}; expected a state dict (parameter name -> tensor)")
    bad = {k: v for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))}
    if bad or not obj:
        raise ConfigError(
            f"{where}: expected a model state dict (parameter name -> tensor), found entries {_describe(bad or obj)}; "
            "pass --key NAME (key=) for the entry that holds the model's state_dict(), e.g. --key model. "
            "An optimizer's torch state_dict() is keyed by parameter index and cannot be imported: save it "
            "with torch.distributed.checkpoint (get_optimizer_state_dict) and import that folder"
        )
    entries = {f"{name}.{k}": v.detach().contiguous() for k, v in obj.items()}
    return ImportedState(os.path.abspath(path), "torch", entries, {name: "model"})
