"""A Lightning checkpoint dict as a dist_ckpt state dict, and back — without pickle.

Lightning hands its ``CheckpointIO`` one nested dict: ``state_dict`` (tensors), optimizer
states (dicts with int keys, tuples), loop progress, callback states (0-dim tensors, paths),
``hyper_parameters``. It is loaded back with no template to load into, so the structure is
stored beside the tensors:

* every tensor becomes one flat entry named after its path (``state_dict/layer.weight``,
  ``optimizer_states/0/state/0/exp_avg``): readable in ``dist-ckpt inspect``;
* the rest — the *skeleton*, with ``None`` where the tensors were — is one JSON value
  (``dist_ckpt.format.json_values``: int keys, tuples, non-finite floats survive), and the
  list of tensor paths another.

A value with no JSON form raises :class:`UnsupportedValue` naming its key path before
anything is written. Dict subclasses (``OrderedDict``, Lightning's ``AttributeDict``) come
back as plain dicts, tuple subclasses (``torch.Size``, namedtuples) as tuples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dist_ckpt.errors import CorruptCheckpoint, UnsupportedValue
from dist_ckpt.format import json_values

SKELETON_KEY = "lightning/skeleton"
PATHS_KEY = "lightning/tensor_paths"


def _path_text(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part!r}]" if not isinstance(part, str) else (f".{part}" if out else part)
    return out or "<root>"


def split_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The flat state dict to save: one entry per tensor, plus the skeleton and the tensor
    paths as JSON strings. Raises :class:`UnsupportedValue` naming the key of a value that
    has no safe stored form."""
    tensors: dict[str, torch.Tensor] = {}
    refs: list[list[Any]] = []

    def walk(value: Any, path: list[Any]) -> Any:
        if isinstance(value, torch.Tensor):
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise UnsupportedValue(
                    f"cannot store {_path_text(path)}: a {type(value).__qualname__} (tensor subclass); "
                    "DistCkptIO stores plain tensors — convert it in on_save_checkpoint"
                )
            name = "/".join(str(p) for p in path) or "tensor"
            base, n = name, 0
            while name in tensors or name in (SKELETON_KEY, PATHS_KEY):
                n += 1
                name = f"{base}#{n}"
            tensors[name] = value.detach()
            refs.append([list(path), name])
            return None
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise UnsupportedValue(
                        f"cannot store {_path_text(path)}: a dict key of type {type(k).__qualname__} ({k!r}); "
                        "keys must be str, int, float, bool or None"
                    )
                out[k] = walk(v, [*path, k])
            return out
        if isinstance(value, tuple):
            return tuple(walk(v, [*path, i]) for i, v in enumerate(value))
        if isinstance(value, list):
            return [walk(v, [*path, i]) for i, v in enumerate(value)]
        return value  # a leaf: json_values checks it (and names its path) below

    skeleton = walk(dict(checkpoint), [])
    flat: dict[str, Any] = dict(tensors)
    try:
        flat[SKELETON_KEY] = json_values.encode(skeleton).decode("utf-8")  # UnsupportedValue names the path
    except UnsupportedValue as e:
        raise UnsupportedValue(
            f"{e} In a Lightning checkpoint: leave it out of save_hyperparameters(ignore=[...]), "
            "or replace or drop it in on_save_checkpoint(). Nothing was written."
        ) from e
    flat[PATHS_KEY] = json_values.encode(refs).decode("utf-8")
    return flat


def load_template(metadata: Metadata, where: str) -> dict[str, Any]:
    """A state dict to load a stored Lightning checkpoint into, built from its metadata:
    an empty tensor of the stored shape and dtype per tensor entry."""
    stored = metadata.state_dict_metadata
    if SKELETON_KEY not in stored or PATHS_KEY not in stored:
        raise CorruptCheckpoint(
            f"{where}: not a Lightning checkpoint written by DistCkptIO (no {SKELETON_KEY!r} entry); "
            "load it with dist_ckpt.load / CheckpointManager.restore instead"
        )
    template: dict[str, Any] = {SKELETON_KEY: "", PATHS_KEY: ""}
    for fqn, md in stored.items():
        if isinstance(md, TensorStorageMetadata):
            template[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return template


def join_checkpoint(loaded: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The Lightning checkpoint dict from a loaded template (inverse of :func:`split_checkpoint`)."""
    skeleton = json_values.decode(str(loaded[SKELETON_KEY]).encode("utf-8"), where=f"{where}: {SKELETON_KEY}")
    refs = json_values.decode(str(loaded[PATHS_KEY]).encode("utf-8"), where=f"{where}: {PATHS_KEY}")
    by_path: dict[tuple[Any, ...], torch.Tensor] = {}
    try:
        for path, name in refs:
            by_path[tuple(json_values._hashable(p) for p in path)] = loaded[name]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"{where}: {PATHS_KEY} names a tensor the checkpoint does not hold ({e})") from e

    def fill(node: Any, path: tuple[Any, ...]) -> Any:
        if path in by_path:
            return by_path[path]
        if isinstance(node, dict):
            return {k: fill(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(fill(v, (*path, i)) for i, v in enumerate(node))
        return node

    if not isinstance(skeleton, dict):
        raise CorruptCheckpoint(f"{where}: {SKELETON_KEY} is not a JSON object")
    return fill(skeleton, ())
