"""S3 and S3-compatible stores through boto3, for ``s3://bucket/prefix`` run roots.

Retries of failed requests are boto3's own (``retry_mode`` / ``max_attempts``); the backend
only re-reads a GET whose *body* broke off mid-stream, which boto3 does not retry. Every
botocore error surfaces as :class:`BackendError` (or a subclass) naming bucket, key and code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends import s3_probe, s3_read
from storage_backends.base import ObjectInfo, Versioned, validate_key
from storage_backends.errors import BackendError, ObjectExists, ObjectNotFound, PreconditionFailed, UnsafeKey
from storage_backends.guarantees import WriteGuarantees
from storage_backends.s3_bucket import S3Bucket
from storage_backends.s3_multipart import S3ObjectWriter
from storage_backends.s3_util import (
    MIN_PART_SIZE,
    MiB,
    RequestStats,
    build_client,
    error_code,
    http_status,
    retry_attempts,
)

log = logging.getLogger(__name__)

_CONFLICT_STATUSES = (409, 412)
_DELETE_BATCH = 1000


class S3Backend:
    """A :class:`~storage_backends.base.Backend` on one ``s3://bucket/prefix`` root.

    ``client`` is a boto3 S3 client to use as is; when None one is built with
    ``endpoint_url`` (or boto3's standard configuration: ``AWS_ENDPOINT_URL_S3``, profiles, ...)
    and boto3 retries in ``retry_mode`` with ``max_attempts``. Writes of at least
    ``multipart_threshold`` bytes become multipart uploads of ``part_size`` parts, up to
    ``max_concurrency`` at once; reads fetch ``part_size`` pieces in parallel.

    Extra attributes: ``bucket``, ``prefix``, ``client``, ``stats`` (a :class:`RequestStats`
    counting requests by operation). The connection itself (client, thread pool, key mapping,
    error translation) is an :class:`~storage_backends.s3_bucket.S3Bucket` shared with the
    reading, writing and probing modules.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        part_size: int = 16 * MiB,
        max_concurrency: int = 8,
        retry_mode: str = "standard",
        max_attempts: int = 5,
        multipart_threshold: int = 16 * MiB,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least 5 MiB ({MIN_PART_SIZE} bytes) for S3, got {part_size}")
        if max_concurrency < 1 or max_attempts < 1 or multipart_threshold < 0:
            raise ValueError("max_concurrency and max_attempts must be >= 1, multipart_threshold >= 0")
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold
        self.max_attempts = max_attempts
        self._options: dict[str, Any] = dict(
            endpoint_url=endpoint_url,
            part_size=part_size,
            max_concurrency=max_concurrency,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            multipart_threshold=multipart_threshold,
        )
        self._injected = client is not None
        self._s3 = S3Bucket(
            bucket,
            prefix,
            client=client,
            new_client=None if self._injected else self._new_client,
            part_size=part_size,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            multipart_threshold=multipart_threshold,
        )

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> S3Backend:
        """``S3Backend`` for ``s3://bucket[/prefix]``; ``options`` go to the constructor."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"S3 URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        return cls(bucket, prefix, **options)

    def __repr__(self) -> str:
        return f"S3Backend({self.uri!r})"

    @property
    def client(self) -> Any:
        return self._s3.client

    @property
    def stats(self) -> RequestStats:
        return self._s3.stats

    def close(self) -> None:
        """Stop the backend's thread pool (it is recreated on next use)."""
        self._s3.close()

    def __getstate__(self) -> dict[str, Any]:
        if self._injected:
            raise TypeError(
                f"{self!r} was given a boto3 client and cannot be pickled; in the child process "
                "open it with S3Backend.from_uri() or storage_backends.open_backend()"
            )
        return {"bucket": self.bucket, "prefix": self.prefix, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bucket"], state["prefix"], **state["options"])  # type: ignore[misc]

    # -- plumbing ---------------------------------------------------------------------------

    def _new_client(self) -> Any:
        o = self._options
        return build_client(
            endpoint_url=o["endpoint_url"],
            retry_mode=o["retry_mode"],
            max_attempts=o["max_attempts"],
            max_pool_connections=2 * self.max_concurrency + 4,
        )

    # -- writing ----------------------------------------------------------------------------

    def open_writer(self, key: str, *, reserve_head: int = 0) -> S3ObjectWriter:
        return S3ObjectWriter(self._s3, key, self._s3.full(key), reserve_head)

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._s3.full(key)
        if len(data) < max(self.multipart_threshold, self.part_size):
            self._s3.put(key, full, data)
            return
        with self.open_writer(key) as w:
            w.write(data)
            w.commit()

    def create_if_absent(self, key: str, data: bytes) -> None:
        full = self._s3.full(key)
        try:
            self._s3.put(key, full, data, IfNoneMatch="*")
        except BackendError as e:
            cause = e.__cause__
            if cause is None or http_status(cause) not in _CONFLICT_STATUSES:
                raise
            if retry_attempts(cause) and self._holds(key, full, data):
                return  # our own first attempt went through before the connection failed
            raise ObjectExists(f"s3://{self.bucket}/{full} already exists ({e.code})", key=key, code=e.code) from cause

    def read_versioned(self, key: str) -> Versioned | None:
        full = self._s3.full(key)
        try:
            data, etag = s3_read.get_whole(self._s3, key, full)
        except FileNotFoundError:
            return None
        return Versioned(data, etag)

    def compare_and_swap(self, key: str, data: bytes, expected_version: str | None) -> str:
        full = self._s3.full(key)
        cond = {"IfNoneMatch": "*"} if expected_version is None else {"IfMatch": expected_version}
        try:
            return self._s3.put(key, full, data, **cond)
        except ObjectNotFound as e:
            if expected_version is None:
                raise
            # AWS S3 (and moto) answer If-Match on a deleted object with 404, SeaweedFS with 412:
            # either way the version we hold is gone.
            raise PreconditionFailed(
                f"s3://{self.bucket}/{full} was deleted since version {expected_version} was read ({e.code}): "
                "another writer got there first; read it again and retry",
                key=key,
                code=e.code,
            ) from e
        except BackendError as e:
            cause = e.__cause__
            if cause is None or http_status(cause) not in _CONFLICT_STATUSES:
                raise
            if retry_attempts(cause):
                current = self.read_versioned(key)
                if current is not None and current.data == data:
                    return current.version  # our own first attempt went through
            what = "already exists" if expected_version is None else f"is no longer version {expected_version}"
            raise PreconditionFailed(
                f"s3://{self.bucket}/{full} {what} ({e.code}): another writer got there first; read it again and retry",
                key=key,
                code=e.code,
            ) from cause

    def write_guarantees(self) -> WriteGuarantees:
        """Check once per endpoint and bucket (cached in this process) that the bucket exists
        and that the server refuses conditional writes whose condition fails (see
        :mod:`storage_backends.s3_probe`); raises :class:`BackendError` naming a missing bucket."""
        return s3_probe.write_guarantees(self._s3, self)

    def _holds(self, key: str, full: str, data: bytes) -> bool:
        try:
            return s3_read.get_whole(self._s3, key, full)[0] == data
        except BackendError:
            return False

    # -- reading ----------------------------------------------------------------------------

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Ranged GETs; a large read is fetched as ``part_size`` pieces in parallel."""
        return s3_read.read(self._s3, key, start, length)

    def read_into(self, key: str, start: int, out: memoryview) -> int:
        """``len(out)`` bytes at ``start`` into ``out``; the count (see ``s3_read.read_into``)."""
        return s3_read.read_into(self._s3, key, start, out)

    def size(self, key: str) -> int:
        return self._s3.size(key)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self._s3.full_prefix(prefix)
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                self.stats.incr("list_objects_v2")
                out.extend(ObjectInfo(self._s3.relative(o["Key"]), int(o["Size"])) for o in page.get("Contents", []))
        except (ClientError, BotoCoreError) as e:
            raise self._s3.error(e, "ListObjectsV2", prefix, full_prefix) from e
        out.sort(key=lambda o: o.key)
        return out

    # -- deleting ---------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        full = self._s3.full(key)
        self._s3.call("delete_object", key, full, Key=full)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.strip("/"):
            raise UnsafeKey("refusing to delete_prefix('') — that would delete the whole run root", key=prefix)
        folder = prefix.rstrip("/") + "/"
        keys = [self._s3.full(o.key) for o in self.list(folder)]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._s3.call(
                "delete_objects",
                folder,
                self._s3.full_prefix(folder),
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise BackendError(
                    f"S3 DeleteObjects under s3://{self.bucket}/{self._s3.full_prefix(folder)} failed for "
                    f"{len(errors)} keys, e.g. {first.get('Key')}: {first.get('Code')}: {first.get('Message')}",
                    key=self._s3.relative(str(first.get("Key", ""))),
                    code=first.get("Code"),
                )
        return len(keys)

    # -- commit protocol --------------------------------------------------------------------

    def staging_prefix(self, final_prefix: str, attempt: str) -> str:
        """S3 uploads are invisible until complete, so files go straight to ``final_prefix``."""
        return final_prefix

    def publish(self, staging_prefix: str, final_prefix: str) -> None:
        """Nothing to do when staging and final are the same (always, for S3). Otherwise copy
        server-side and delete the staging objects (not atomic; only for callers that chose a
        separate staging prefix themselves)."""
        if staging_prefix.rstrip("/") == final_prefix.rstrip("/"):
            return
        src, dst = staging_prefix.rstrip("/") + "/", final_prefix.rstrip("/") + "/"
        if self.list(dst):
            raise ObjectExists(f"s3://{self.bucket}/{self._s3.full_prefix(dst)} already holds objects", key=dst)
        for obj in self.list(src):
            target = dst + obj.key[len(src) :]
            full_target = self._s3.full(target)
            self.stats.incr("copy")
            try:
                self.client.copy({"Bucket": self.bucket, "Key": self._s3.full(obj.key)}, self.bucket, full_target)
            except (ClientError, BotoCoreError) as e:
                raise self._s3.error(e, "CopyObject", target, full_target) from e
        self.delete_prefix(src)

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime | None]]:
        full_prefix = self._s3.full_prefix(prefix)
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full_prefix)
            for page in pages:
                self.stats.incr("list_multipart_uploads")
                for up in page.get("Uploads", []) or []:
                    yield up["Key"], up["UploadId"], up.get("Initiated")
        except (ClientError, BotoCoreError) as e:
            raise self._s3.error(e, "ListMultipartUploads", prefix, full_prefix) from e

    def abandoned_uploads(self, prefix: str = "", *, older_than: float | None = None) -> Iterator[str]:
        """Keys of unfinished multipart uploads below ``prefix``; with ``older_than`` (seconds)
        only those started that long ago, so uploads of a running job can be spared."""
        for full_key, _, _ in self._old_uploads(prefix, older_than):
            yield self._s3.relative(full_key)

    def abort_uploads(self, prefix: str = "", *, older_than: float | None = None) -> int:
        count = 0
        for full_key, upload_id, _ in list(self._old_uploads(prefix, older_than)):
            self.stats.incr("abort_multipart_upload")
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            except (ClientError, BotoCoreError) as e:
                if error_code(e) == "NoSuchUpload":
                    continue  # someone else aborted or completed it meanwhile
                raise self._s3.error(e, "AbortMultipartUpload", self._s3.relative(full_key), full_key) from e
            log.info("aborted unfinished upload of s3://%s/%s", self.bucket, full_key)
            count += 1
        return count

    def _old_uploads(self, prefix: str, older_than: float | None) -> Iterator[tuple[str, str, datetime | None]]:
        now = datetime.now(timezone.utc)
        for up in self._uploads(prefix):
            started = up[2]
            if older_than is None or started is None or (now - started).total_seconds() >= older_than:
                yield up
