"""dist_ckpt: distributed, sharded, asynchronous checkpointing for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

import logging

from dist_ckpt.api import load, save
from dist_ckpt.config import ManagerConfig
from dist_ckpt.manager import CheckpointInfo, CheckpointManager, ResumeInfo
from dist_ckpt.resume_flags import add_checkpoint_args
from dist_ckpt.state import TrainingState
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

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the library never prints

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
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
    "load",
    "save",
]
