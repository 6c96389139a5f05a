"""Model weights from files that are not dist_ckpt checkpoints, for ``--init-from``: a plain
safetensors file, or a Hugging Face folder (``config.json`` with ``model.safetensors``, or the
shards that ``model.safetensors.index.json`` lists — the layout ``dist-ckpt export`` writes).

Files are read with ``safetensors`` (no pickle, ever) and matched by key to the tracked models:
a model takes the keys of its own ``state_dict()``, either as they are or under its tracked
name (``generator.0.weight``: how ``dist-ckpt export`` names the models of a multi-model
checkpoint). Every key must find its place and every parameter a key, with the same shape —
otherwise :class:`IncompatibleCheckpoint` names the file and the keys, before any model is
modified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dist_ckpt.errors import ConfigError, CorruptCheckpoint, IncompatibleCheckpoint

HF_CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"  # the names dist_ckpt.export writes, as Hugging Face does
INDEX_FILE = "model.safetensors.index.json"
_SHOW = 5  # keys named in an error message


@dataclass(frozen=True)
class WeightFiles:
    """Where ``--init-from`` finds weights: ``kind`` is ``"safetensors"`` (one file) or ``"hf"``."""

    source: str
    kind: str
    files: tuple[str, ...]


def find_weight_files(path: str) -> WeightFiles | None:
    """The weight files ``path`` names when it is a ``.safetensors`` file or a Hugging Face
    folder; None when it is neither (e.g. a dist_ckpt checkpoint folder). Raises
    :class:`ConfigError` for a Hugging Face folder whose weights are missing."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return WeightFiles(path, "safetensors", (path,)) if path.endswith(".safetensors") else None
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        return None
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return WeightFiles(path, "hf", _files_of_index(index))
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return WeightFiles(path, "hf", (single,))
    raise ConfigError(
        f"{path} has a {HF_CONFIG} but no weights: expected {SINGLE_FILE}, or {INDEX_FILE} and the shards it lists"
    )


def _files_of_index(index: str) -> tuple[str, ...]:
    folder = os.path.dirname(index)
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"{index}: not a valid index (expected JSON with a 'weight_map' of key -> file): {e}"
        ) from e
    files = []
    for name in names:
        # the index only names shards beside it: nothing outside the folder is ever opened
        if (
            not isinstance(name, str)
            or os.path.basename(name) != name
            or name in ("", ".", "..")
            or "\\" in name
            or "\0" in name
        ):
            raise CorruptCheckpoint(f"{index}: shard name {name!r} is not a plain file name in {folder}")
        if not os.path.isfile(os.path.join(folder, name)):
            raise CorruptCheckpoint(f"{index} lists {name}, which is missing from {folder}")
        files.append(os.path.join(folder, name))
    if not files:
        raise CorruptCheckpoint(f"{index}: its weight_map lists no shard")
    return tuple(files)


def _read(files: WeightFiles) -> dict[str, tuple[torch.Tensor, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for file in files.files:
        try:
            loaded = load_file(file)
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpoint(f"{file}: not a readable safetensors file: {e}") from e
        for key, tensor in loaded.items():
            if key in tensors:
                raise CorruptCheckpoint(f"{files.source}: key {key!r} is stored twice ({tensors[key][1]} and {file})")
            tensors[key] = (tensor, file)
    return tensors


def load_weight_files(files: WeightFiles, models: Mapping[str, nn.Module]) -> None:
    """Load ``files`` into ``models`` (tracked name -> module; plain, DDP or FSDP2). Every
    rank calls it; each reads the files (they must be visible to every rank)."""
    if not models:
        raise ConfigError(f"--init-from {files.source}: no model is tracked to load the weights into")
    tensors = _read(files)
    plans: dict[str, dict[str, torch.Tensor]] = {}
    used: set[str] = set()
    for name, module in models.items():
        expected = get_model_state_dict(module)
        if set(expected) <= set(tensors) and len(models) == 1:
            keys = {k: k for k in expected}
        else:
            keys = {k: f"{name}.{k}" for k in expected}
        missing = [stored for stored in keys.values() if stored not in tensors]
        if missing:
            raise IncompatibleCheckpoint(
                f"{files.source}: no weights for model {name!r}: {len(missing)} of its keys are missing, e.g. "
                f"{missing[:_SHOW]} (the file holds e.g. {sorted(tensors)[:_SHOW]}); keys must be those of "
                f"{name}.state_dict(), bare or prefixed with '{name}.'"
            )
        sd = {}
        for own, stored in keys.items():
            tensor, file = tensors[stored]
            want = expected[own]
            if tuple(tensor.shape) != tuple(want.shape):
                raise IncompatibleCheckpoint(
                    f"{file}: {stored!r} has shape {tuple(tensor.shape)}, model {name!r} expects {tuple(want.shape)}"
                )
            sd[own] = tensor.to(want.dtype)
        plans[name] = sd
        used |= set(keys.values())
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise IncompatibleCheckpoint(
            f"{files.source}: {len(unexpected)} keys belong to no tracked model ({', '.join(models)}), e.g. "
            f"{unexpected[:_SHOW]}; export only the model's weights (dist-ckpt export without --include-optimizer)"
        )
    for name, module in models.items():  # only now: every model's weights were found and fit
        set_model_state_dict(module, plans[name], options=StateDictOptions(full_state_dict=True, strict=True))
