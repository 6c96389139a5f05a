"""``dist_ckpt.import_checkpoint``: turn a checkpoint written by other tools into a committed
dist_ckpt checkpoint of a run — a DCP checkpoint folder, a ``torch.save`` file, or a Hugging
Face safetensors folder (one module per source format; :mod:`.commit` writes the result).

Nothing is unpickled freely: DCP's ``.metadata`` goes through a restricted unpickler
(:mod:`.dcp_metadata`), every ``torch.save`` payload through ``torch.load(weights_only=True)``,
safetensors through ``safetensors``.
"""

from __future__ import annotations

import os

from dist_ckpt.errors import CheckpointNotFound, ConfigError
from dist_ckpt.importers.commit import ImportResult, write_imported
from dist_ckpt.importers.source import ImportedState

__all__ = ["FORMATS", "ImportResult", "import_checkpoint", "read_source"]

FORMATS = ("dcp", "torch", "hf", "safetensors")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def _detect(path: str) -> str:
    from dist_ckpt.importers.dcp_folder import is_dcp_folder
    from dist_ckpt.importers.hf_folder import hf_weight_files

    if os.path.isdir(path):
        if is_dcp_folder(path):
            return "dcp"
        if hf_weight_files(path) is not None:
            return "hf"
        shown = sorted(os.listdir(path))[:8]
        raise ConfigError(
            f"{path}: not a checkpoint import knows: expected a DCP folder (.metadata and *.distcp files) or a "
            f"Hugging Face folder (config.json with model.safetensors or model.safetensors.index.json); it holds "
            f"{shown or 'nothing'}"
        )
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(TORCH_SUFFIXES):
        return "torch"
    raise ConfigError(
        f"{path}: unknown format; import reads a DCP folder, a Hugging Face folder, a .safetensors file or a "
        f"torch.save file ({', '.join(TORCH_SUFFIXES)}); pass format='torch' (--format torch) for another name"
    )


def read_source(
    src: str, *, format: str | None = None, name: str | None = None, key: str | None = None
) -> ImportedState:
    """Read ``src`` whole (see :func:`import_checkpoint`); nothing is written."""
    if "://" in src:
        raise ConfigError(f"{src}: import reads a local path (or NFS); copy the source here first")
    path = os.path.abspath(src)
    if not os.path.exists(path):
        raise CheckpointNotFound(f"{path}: no such file or folder to import")
    if format is not None and format not in FORMATS:
        raise ConfigError(f"format={format!r}: expected one of {', '.join(FORMATS)} (or None to detect it)")
    kind = format or _detect(path)
    if key is not None and kind not in ("torch", "dcp"):
        raise ConfigError(
            f"key={key!r} (--key) selects an entry of a torch.save file or DCP folder; {path} is read as {kind}"
        )
    if kind == "dcp":
        from dist_ckpt.importers.dcp_folder import is_dcp_folder, read_dcp_folder

        if not is_dcp_folder(path):
            raise ConfigError(f"{path}: not a DCP checkpoint folder (no .metadata file in it)")
        return read_dcp_folder(path, name, key)
    if kind == "torch":
        from dist_ckpt.importers.torch_file import read_torch_file

        if not os.path.isfile(path):
            raise ConfigError(f"{path}: a torch.save import needs a file, this is a folder")
        return read_torch_file(path, name or "model", key)
    from dist_ckpt.importers.hf_folder import read_hf_folder
    from dist_ckpt.init_weights import find_weight_files

    files = find_weight_files(path)
    if files is None or (kind == "hf") != (files.kind == "hf"):
        expected = (
            "a Hugging Face folder (config.json + model.safetensors or its index)"
            if kind == "hf"
            else "a .safetensors file"
        )
        raise ConfigError(f"{path}: format {kind!r} expects {expected}")
    result = read_hf_folder(files, name or "model")
    return result if kind == "hf" else ImportedState(result.source, "safetensors", result.entries, result.objects)


def import_checkpoint(
    src: str,
    dst_run: str,
    *,
    step: int = 0,
    format: str | None = None,
    name: str | None = None,
    key: str | None = None,
    compression: str = "none",
    unsafe_single_writer: bool = False,
) -> ImportResult:
    """Import the checkpoint at ``src`` (a local path) into the run root ``dst_run`` (a path or
    ``s3://`` URI) as the committed checkpoint of ``step``; it then restores with
    ``CheckpointManager.restore()`` / ``load_weights()`` and reshards like any other.

    ``format``: ``"dcp"`` (a ``torch.distributed.checkpoint`` folder), ``"torch"`` (a
    ``torch.save`` file), ``"hf"`` (a Hugging Face folder), ``"safetensors"`` (one file), or
    None to detect it. ``name``: the tracked name the weights go under — default ``"model"``
    for torch/HF/safetensors (``mgr.track(model=...)``); a DCP checkpoint keeps its own
    top-level names (``{"model": ..., "optim": ...}`` → ``track(model=..., optim=...)``)
    unless ``name`` is given (for a ``dcp.save(model.state_dict())`` folder). ``key``: the
    entry of a ``torch.save`` dict that holds the state dict (``"model"``, ``"state_dict"``),
    or the prefix of a DCP checkpoint's keys to take and strip (``"app"`` for the DCP
    tutorial's ``{"app": AppState(model, optimizer)}``: ``app.model.*`` → ``model.*``).

    The source is read whole and checked before anything is written; then the run's writer
    lock is taken and the step committed with the library's protocol (never overwriting a
    committed step, never behind the run's last). One process calls it (not every rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            "import_checkpoint runs in one process: call it outside the training job (or use `dist-ckpt import`)"
        )
    state = read_source(src, format=format, name=name, key=key)
    return write_imported(state, dst_run, step=step, compression=compression, unsafe_single_writer=unsafe_single_writer)
