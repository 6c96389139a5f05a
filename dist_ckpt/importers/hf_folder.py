"""Import a Hugging Face folder: ``config.json`` with ``model.safetensors``, or the shards its
``model.safetensors.index.json`` lists (read with ``safetensors``; no pickle). The tensors go
under ``name`` with the keys the files hold (``model.<key>``)."""

from __future__ import annotations

import os

from dist_ckpt.importers.source import ImportedState
from dist_ckpt.init_weights import WeightFiles, _read, find_weight_files


def hf_weight_files(path: str) -> WeightFiles | None:
    """The folder's weight files, None when ``path`` is no Hugging Face folder."""
    found = find_weight_files(path) if os.path.isdir(path) else None
    return found if found is not None and found.kind == "hf" else None


def read_hf_folder(files: WeightFiles, name: str) -> ImportedState:
    tensors = _read(files)  # CorruptCheckpoint naming the file; a key stored twice is refused
    entries = {f"{name}.{k}": t for k, (t, _) in tensors.items()}
    return ImportedState(files.source, "hf", entries, {name: "model"})
