"""dist_ckpt: distributed, sharded, asynchronous checkpointing for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

from dist_ckpt.api import load, save
from dist_ckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    StepAlreadyExists,
    StorageError,
    UnsupportedValue,
)

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "IncompatibleCheckpoint",
    "StepAlreadyExists",
    "StorageError",
    "UnsupportedValue",
    "__version__",
    "load",
    "save",
]
