"""The exception hierarchy of dist_ckpt.

Every error the library raises on purpose is a :class:`CheckpointError`. Messages say what was
expected, what was found, and what to do; they name the file, key or option involved.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every dist_ckpt error."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists where one was asked for."""


class StepAlreadyExists(CheckpointError, FileExistsError):
    """A committed checkpoint for this step exists already; committed steps are never overwritten."""


class CorruptCheckpoint(CheckpointError, ValueError):
    """A checkpoint file failed a check: checksum, truncation, bad header, unsafe content."""


class IncompatibleCheckpoint(CheckpointError, ValueError):
    """The checkpoint's keys, shapes or dtypes do not match the state being loaded."""


class StorageError(CheckpointError, OSError):
    """The storage backend failed; the backend's exception is kept as ``__cause__``."""


class UnsupportedValue(CheckpointError, TypeError):
    """A non-tensor value in the state cannot be stored as JSON (pickle is never used)."""


class InconsistentState(CheckpointError, ValueError):
    """The ranks of one save disagree about the state (e.g. the DTensors a mesh holds)."""


class ConfigError(CheckpointError, ValueError):
    """A dist_ckpt option or argument is invalid."""


class ConfigChanged(CheckpointError, ValueError):
    """The run config differs from the checkpoint's and ``strict_config`` is set."""


class RunLocked(CheckpointError):
    """Another job holds the run's writer lock, or this job lost it (a fenced commit)."""


class CheckpointArgsError(ConfigError):
    """The command-line checkpoint flags (``--resume``, ``--init-from``, ...) ask for something
    the run cannot do; the script exits with status 2, as argparse does for bad arguments."""


class SnapshotInconsistent(CheckpointError):
    """A tensor of an overlapped save (``async_save=True`` or ``"overlap"``) changed in place
    before the staging copy had it; the save is not committed (never a torn snapshot)."""


def error_class(type_name: str) -> type[CheckpointError] | None:
    """The dist_ckpt error class named ``type_name``, or None (errors cross a thread or
    process boundary as ``(type name, message)``: nothing is unpickled)."""
    cls = globals().get(type_name)
    return cls if isinstance(cls, type) and issubclass(cls, CheckpointError) else None


def rebuild_error(type_name: str, message: str) -> CheckpointError:
    """The dist_ckpt error named ``type_name`` (a :class:`CheckpointError` for others)."""
    cls = error_class(type_name)
    return cls(message) if cls is not None else CheckpointError(f"{type_name}: {message}")
