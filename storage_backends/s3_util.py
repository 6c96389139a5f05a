"""Helpers of the S3 backend: error translation, request counters, range splitting, client set-up.

Nothing here talks to S3 by itself; :mod:`storage_backends.s3` and
:mod:`storage_backends.s3_multipart` use these.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from storage_backends.errors import BackendError, ObjectNotFound

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3's minimum size of every part of a multipart upload except the last."""
MAX_PARTS = 10_000
"""S3's maximum number of parts of one multipart upload."""

BODY_READ_ERRORS: tuple[type[BaseException], ...] = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    ConnectionError,
)
"""Failures while streaming a GET response body. botocore's retries stop once the response
headers arrived, so these are retried by the backend itself (as s3transfer does)."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})


def build_client(
    *,
    endpoint_url: str | None = None,
    retry_mode: str = "standard",
    max_attempts: int = 5,
    max_pool_connections: int = 16,
    config: botocore.config.Config | None = None,
    **client_kwargs: Any,
) -> Any:
    """A new boto3 S3 client with boto3's own retries (``retry_mode``; ``max_attempts`` counts
    the first attempt too, like ``AWS_MAX_ATTEMPTS``: botocore's ``total_max_attempts``).

    The endpoint, credentials and region come from boto3's standard configuration
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, ...)
    unless given here; ``client_kwargs`` go to ``Session.client`` (e.g. ``aws_access_key_id``).
    Payload signing follows :func:`payload_signing_config`.
    """
    retries: Any = {"mode": retry_mode, "total_max_attempts": max_attempts}
    base = botocore.config.Config(
        retries=retries,
        max_pool_connections=max_pool_connections,
    )
    if config is not None:
        base = base.merge(config)
    session, core = shared_session()
    signing = payload_signing_config(core, base)
    if signing is not None:
        base = base.merge(signing)
    with _SESSION_LOCK:  # a boto3 Session is not thread-safe; the clients it makes are
        return session.client("s3", endpoint_url=endpoint_url, config=base, **client_kwargs)


_SESSION_LOCK = threading.Lock()
_SESSIONS: dict[tuple[Any, ...], tuple[boto3.session.Session, botocore.session.Session]] = {}


def _after_fork_in_child() -> None:
    # a thread of the parent may have held the lock at fork(): it never releases it here
    global _SESSION_LOCK
    _SESSION_LOCK = threading.Lock()
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shared_session() -> tuple[boto3.session.Session, botocore.session.Session]:
    """One boto3 Session per process and AWS environment, as ``boto3.client()`` keeps one.

    A new Session parses botocore's service models again (~0.1 s of CPU per client, more than
    the rest of a small save); reusing it makes a client in ~10 ms. The key is every ``AWS_*``
    environment variable, so a changed endpoint, profile or key still takes effect at once;
    credentials that expire are refreshed by the Session itself, as in any boto3 program.
    """
    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _SESSION_LOCK:
        pair = _SESSIONS.get(key)
        if pair is None:
            if len(_SESSIONS) > 16:  # an environment that keeps changing: don't grow without bound
                _SESSIONS.clear()
            core = botocore.session.Session()
            pair = _SESSIONS[key] = (boto3.session.Session(botocore_session=core), core)
        return pair


def payload_signing_config(
    core: botocore.session.Session, config: botocore.config.Config
) -> botocore.config.Config | None:
    """``s3.payload_signing_enabled = False`` unless the user's configuration sets it.

    On plain-http endpoints (a loopback or LAN MinIO, SeaweedFS, Ceph) botocore otherwise
    SHA-256-hashes every request body to sign it (~0.6 s of CPU per GB; on https it already
    sends UNSIGNED-PAYLOAD). The body's integrity stays checked by the server: botocore sends
    a CRC32 of every PutObject/UploadPart body (``request_checksum_calculation``, default
    ``when_supported``), as the AWS CRT client does. A profile's ``s3 =
    payload_signing_enabled = true`` (or a ``Config(s3=...)`` given here) is kept as is.
    """
    if "payload_signing_enabled" in (config.s3 or {}):
        return None
    try:
        from_profile = core.get_config_variable("s3") or {}
    except botocore.exceptions.ProfileNotFound:
        return None  # creating the client reports the missing profile
    if "payload_signing_enabled" in from_profile:
        return None
    return botocore.config.Config(s3={**(config.s3 or {}), "payload_signing_enabled": False})


class RequestStats:
    """Thread-safe counts of the S3 requests a backend issued, by operation name
    (``get_object``, ``put_object``, ``upload_part``, ...). Retries inside boto3 are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        return f"RequestStats({self.snapshot()})"


def error_code(e: BaseException) -> str:
    """The S3 error code of a botocore error (``NoSuchKey``, ``PreconditionFailed``, ...),
    or the exception class name for connection-level errors."""
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = err.get("Code")
        if code:
            return str(code)
        return str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "Unknown"))
    return type(e).__name__


def http_status(e: BaseException) -> int | None:
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def retry_attempts(e: BaseException) -> int:
    """How many times boto3 retried the request that ended in ``e`` (0 when unknown)."""
    if isinstance(e, ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
    return 0


def translate(
    e: BaseException,
    *,
    op: str,
    bucket: str,
    full_key: str,
    key: str | None,
    endpoint: str | None = None,
) -> BackendError:
    """Turn a botocore error into a :class:`BackendError` (or :class:`ObjectNotFound`) whose
    message names the operation, bucket, key and S3 error code. Raise it ``from e``."""
    code = error_code(e)
    status = http_status(e)
    where = f"s3://{bucket}/{full_key}"
    if isinstance(e, ClientError):
        # servers end their messages with a period or not; the hints below add their own
        message = ((e.response.get("Error", {}) or {}).get("Message") or str(e)).rstrip(". ")
        retries = retry_attempts(e)
        detail = f"{code} (HTTP {status}" + (f", after {retries} retries" if retries else "") + f"): {message}"
    else:
        detail = f"{code}: {e}"
    text = f"S3 {op} of {where} failed: {detail}"
    if code in _NOT_FOUND_CODES:
        return ObjectNotFound(f"object {where} does not exist ({op}: {code})", key=key, code=code)
    if code == "NoSuchBucket":
        text += f". Bucket {bucket!r} does not exist: create it or fix the URI"
    elif code in _AUTH_CODES or isinstance(e, NoCredentialsError):
        text += ". Check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        if code == "AccessDenied":  # also what servers with bucket-scoped credentials answer for a missing bucket
            text += f" and that bucket {bucket!r} exists"
    elif isinstance(e, BotoCoreError) and ("Endpoint" in code or "Connect" in code):
        text += f". Is the S3 endpoint {endpoint or '(AWS default)'} reachable? Set AWS_ENDPOINT_URL_S3 to change it"
    return BackendError(text, key=key, code=code)


def split_span(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into consecutive ``(start, end)`` pieces of at most ``chunk`` bytes."""
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)] or [(start, start)]


def parse_total_size(content_range: str | None) -> int | None:
    """The object size from a ``Content-Range: bytes a-b/total`` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None
