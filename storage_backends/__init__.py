"""Storage backends: bytes in, bytes out, no torch. ``open_backend(uri)`` picks one by URI."""

from __future__ import annotations

import logging
from typing import Any

from storage_backends.base import (
    Backend,
    ConditionalWrites,
    ObjectInfo,
    ObjectWriter,
    ReadableStore,
    Staging,
    Versioned,
    WritableStore,
    join_key,
    validate_key,
)
from storage_backends.errors import (
    BackendError,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
    UnsafeKey,
)
from storage_backends.guarantees import WriteGuarantees, write_guarantees

__all__ = [
    "Backend",
    "BackendError",
    "ConditionalWrites",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectWriter",
    "PreconditionFailed",
    "ReadableStore",
    "Staging",
    "UnsafeKey",
    "Versioned",
    "WritableStore",
    "WriteGuarantees",
    "join_key",
    "open_backend",
    "split_uri",
    "validate_key",
    "write_guarantees",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_SCHEMES = ("file", "s3")


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a URI; a plain path is scheme ``file``."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"invalid storage URI {uri!r}: expected a path, file:// or s3:// URI")
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unsupported storage URI scheme {scheme!r} in {uri!r}: use a local path, "
            "file:///path or s3://bucket/prefix"
        )
    return scheme, rest


def open_backend(uri: str, **options: Any) -> Backend:
    """Open the backend for ``uri``: a path or ``file://`` → :class:`LocalBackend`,
    ``s3://bucket/prefix`` → :class:`S3Backend` (boto3, endpoint from the standard config).
    ``options`` go to the backend's constructor."""
    scheme, rest = split_uri(uri)
    if scheme == "s3":
        from storage_backends.s3 import S3Backend

        return S3Backend.from_uri(uri, **options)
    from storage_backends.local import LocalBackend

    return LocalBackend(rest, **options)
