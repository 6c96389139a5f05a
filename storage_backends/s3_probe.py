"""The start-up check of an S3 run root before anything is written: does the bucket exist, and
does the server enforce conditional writes (``If-None-Match: *``, ``If-Match``)?

Run once per endpoint and bucket in a process (the answer is cached; failures are not), by
:meth:`S3Backend.write_guarantees`. Costs one ``ListObjectsV2`` and about seven small requests
on one object below :data:`~storage_backends.guarantees.PROBE_PREFIX`, which is deleted.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends.errors import BackendError
from storage_backends.guarantees import WriteGuarantees, probe_conditional_writes
from storage_backends.s3_util import error_code, http_status, translate

if TYPE_CHECKING:
    from storage_backends.s3 import S3Backend

_cache: dict[tuple[str | None, str], WriteGuarantees] = {}
_cache_lock = threading.Lock()


def endpoint_of(backend: S3Backend) -> str | None:
    return getattr(getattr(backend.client, "meta", None), "endpoint_url", None)


def describe(backend: S3Backend) -> str:
    """``bucket 'b' at endpoint http://...`` — how errors name the store."""
    return f"bucket {backend.bucket!r} at endpoint {endpoint_of(backend) or '(AWS default)'}"


def check_bucket(backend: S3Backend) -> None:
    """One ``ListObjectsV2`` (at most one key) below the run root — the permission every
    writer needs anyway. A missing bucket is named as such; a 403 is too, since servers with
    bucket-scoped credentials (SeaweedFS) answer 403 for a bucket that does not exist."""
    full_prefix = backend.prefix + "/" if backend.prefix else ""
    backend.stats.incr("list_objects_v2")
    try:
        backend.client.list_objects_v2(Bucket=backend.bucket, Prefix=full_prefix, MaxKeys=1)
    except (ClientError, BotoCoreError) as e:
        code, status = error_code(e), http_status(e)
        where = f"endpoint {endpoint_of(backend) or '(AWS default)'}"
        if code == "NoSuchBucket" or status == 404:
            raise BackendError(
                f"bucket {backend.bucket!r} does not exist at {where} (ListObjectsV2: {code}): "
                f"create it, or fix the bucket name in {backend.uri}",
                code=code,
            ) from e
        if status == 403:
            raise BackendError(
                f"bucket {backend.bucket!r} does not exist at {where}, or these credentials may not "
                f"list it (ListObjectsV2: {code}, HTTP 403): check the bucket name in {backend.uri}, and "
                "that the credentials (AWS_ACCESS_KEY_ID or AWS_PROFILE) may list and write it",
                code=code,
            ) from e
        raise translate(
            e, op="ListObjectsV2", bucket=backend.bucket, full_key=full_prefix, key=None, endpoint=endpoint_of(backend)
        ) from e


def write_guarantees(backend: S3Backend) -> WriteGuarantees:
    """The bucket check and the conditional-write probe, once per (endpoint, bucket)."""
    cache_key = (endpoint_of(backend), backend.bucket)
    with _cache_lock:
        known = _cache.get(cache_key)
    if known is not None:
        return known
    check_bucket(backend)
    result = probe_conditional_writes(backend, describe(backend))
    with _cache_lock:
        _cache[cache_key] = result
    return result
