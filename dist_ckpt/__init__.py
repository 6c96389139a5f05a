"""dist_ckpt: distributed, sharded, asynchronous checkpointing for PyTorch training.

The names below are imported on first use (PEP 562): ``import dist_ckpt`` alone does not
import torch, so the ``dist-ckpt`` command line lists, inspects and verifies checkpoints in a
fraction of the time ``import torch`` takes. ``from dist_ckpt import CheckpointManager`` works
as always.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import (
    CheckpointArgsError,
    CheckpointError,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    StepAlreadyExists,
    StorageError,
    UnsupportedValue,
)
from dist_ckpt.version import __version__

if TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports them
    from dist_ckpt.api import load, save
    from dist_ckpt.config import ManagerConfig
    from dist_ckpt.importers import ImportResult, import_checkpoint
    from dist_ckpt.manager import CheckpointInfo, CheckpointManager, LoadedWeights, ResumeInfo
    from dist_ckpt.resume_flags import add_checkpoint_args
    from dist_ckpt.state import TrainingState

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the library never prints

# name -> module that defines it (the modules that import torch)
_LAZY = {
    "load": "dist_ckpt.api",
    "save": "dist_ckpt.api",
    "ManagerConfig": "dist_ckpt.config",
    "ImportResult": "dist_ckpt.importers",
    "import_checkpoint": "dist_ckpt.importers",
    "CheckpointInfo": "dist_ckpt.manager",
    "CheckpointManager": "dist_ckpt.manager",
    "LoadedWeights": "dist_ckpt.manager",
    "ResumeInfo": "dist_ckpt.manager",
    "TrainingState": "dist_ckpt.state",
    "add_checkpoint_args": "dist_ckpt.resume_flags",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "LoadedWeights",
    "ManagerConfig",
    "ResumeInfo",
    "TrainingState",
    "CheckpointArgsError",
    "CheckpointError",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "IncompatibleCheckpoint",
    "StepAlreadyExists",
    "StorageError",
    "UnsupportedValue",
    "__version__",
    "add_checkpoint_args",
    "import_checkpoint",
    "ImportResult",
    "load",
    "save",
]
