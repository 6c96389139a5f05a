"""Errors of the storage layer. They know nothing of dist_ckpt; dist_ckpt wraps them."""

from __future__ import annotations


class BackendError(OSError):
    """An operation on the store failed. ``key`` names the object, ``code`` the store's error code."""

    def __init__(self, message: str, *, key: str | None = None, code: str | None = None):
        super().__init__(message)
        self.key = key
        self.code = code


class ObjectNotFound(BackendError, FileNotFoundError):
    """The object does not exist."""


class ObjectExists(BackendError, FileExistsError):
    """A create-if-absent found the object already there, or a publish found its target taken."""


class PreconditionFailed(BackendError):
    """A compare-and-swap lost: the object changed since it was read."""


class UnsafeKey(BackendError, ValueError):
    """A key tries to leave the backend's root (``..``, absolute path, NUL)."""
