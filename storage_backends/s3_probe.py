"""The start-up check of an S3 run root before anything is written: does the bucket exist, and
does the server enforce conditional writes (``If-None-Match: *``, ``If-Match``)?

Run once per endpoint and bucket in a process (the answer is cached; failures are not), by
:meth:`S3Backend.write_guarantees`. Costs one ``ListObjectsV2`` and about seven small requests
on one object below :data:`~storage_backends.guarantees.PROBE_PREFIX`, which is deleted.
"""

from __future__ import annotations

import threading

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends.base import Backend
from storage_backends.errors import BackendError
from storage_backends.guarantees import WriteGuarantees, probe_conditional_writes
from storage_backends.s3_bucket import S3Bucket
from storage_backends.s3_util import error_code, http_status

_cache: dict[tuple[str | None, str], WriteGuarantees] = {}
_cache_lock = threading.Lock()


def describe(s3: S3Bucket) -> str:
    """``bucket 'b' at endpoint http://...`` — how errors name the store."""
    return f"bucket {s3.bucket!r} at endpoint {s3.endpoint or '(AWS default)'}"


def check_bucket(s3: S3Bucket, uri: str) -> None:
    """One ``ListObjectsV2`` (at most one key) below the run root — the permission every
    writer needs anyway. A missing bucket is named as such; a 403 is too, since servers with
    bucket-scoped credentials (SeaweedFS) answer 403 for a bucket that does not exist."""
    full_prefix = s3.prefix + "/" if s3.prefix else ""
    s3.stats.incr("list_objects_v2")
    try:
        s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=full_prefix, MaxKeys=1)
    except (ClientError, BotoCoreError) as e:
        code, status = error_code(e), http_status(e)
        where = f"endpoint {s3.endpoint or '(AWS default)'}"
        if code == "NoSuchBucket" or status == 404:
            raise BackendError(
                f"bucket {s3.bucket!r} does not exist at {where} (ListObjectsV2: {code}): "
                f"create it, or fix the bucket name in {uri}",
                code=code,
            ) from e
        if status == 403:
            raise BackendError(
                f"bucket {s3.bucket!r} does not exist at {where}, or these credentials may not "
                f"list it (ListObjectsV2: {code}, HTTP 403): check the bucket name in {uri}, and "
                "that the credentials (AWS_ACCESS_KEY_ID or AWS_PROFILE) may list and write it",
                code=code,
            ) from e
        raise s3.error(e, "ListObjectsV2", None, full_prefix) from e


def write_guarantees(s3: S3Bucket, backend: Backend) -> WriteGuarantees:
    """The bucket check of ``s3`` and the conditional-write probe through ``backend``'s own
    methods, once per (endpoint, bucket)."""
    cache_key = (s3.endpoint, s3.bucket)
    with _cache_lock:
        known = _cache.get(cache_key)
    if known is not None:
        return known
    check_bucket(s3, backend.uri)
    result = probe_conditional_writes(backend, describe(s3))
    with _cache_lock:
        _cache[cache_key] = result
    return result
