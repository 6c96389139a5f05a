"""One bucket and key prefix reached through one boto3 client: what the S3 backend's modules
share (:mod:`storage_backends.s3`, :mod:`storage_backends.s3_read`,
:mod:`storage_backends.s3_multipart`, :mod:`storage_backends.s3_probe`).

Each of them is handed an :class:`S3Bucket` instead of reaching into the backend, so none of
them imports another's private names and there is no import circle: ``s3`` imports the
others, they import only this module and :mod:`storage_backends.s3_util`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends.base import validate_key
from storage_backends.errors import BackendError
from storage_backends.s3_util import RequestStats, translate


class S3Bucket:
    """``s3://bucket/prefix`` through one client, with the transfer limits of its backend.

    ``client`` is used as is when given (pass ``new_client=None`` with it: an injected client
    is kept after a fork too); otherwise ``new_client()`` makes one, and again in a child
    process after ``fork()``, whose parent's sockets must not be shared. ``stats`` counts
    the requests issued, by operation.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        client: Any,
        new_client: Callable[[], Any] | None,
        part_size: int,
        max_concurrency: int,
        max_attempts: int,
        multipart_threshold: int,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        self.stats = RequestStats()
        self._new_client = new_client
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._client = client if client is not None else self._make_client()

    def _make_client(self) -> Any:
        if self._new_client is None:
            raise ValueError("S3Bucket needs a client or a way to make one (new_client)")
        return self._new_client()

    @property
    def client(self) -> Any:
        self._check_fork()
        return self._client

    @property
    def endpoint(self) -> str | None:
        """The client's endpoint URL, for messages (None: AWS's default)."""
        return getattr(getattr(self._client, "meta", None), "endpoint_url", None)

    def _check_fork(self) -> None:
        """After ``fork()`` the parent's threads are gone and its sockets must not be shared."""
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    self._pool = None
                    if self._new_client is not None:
                        self._client = self._new_client()
                    self._pid = os.getpid()

    def executor(self) -> ThreadPoolExecutor:
        """The shared pool for parallel GETs and part uploads (``max_concurrency`` threads)."""
        self._check_fork()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-backend")
            return self._pool

    def close(self) -> None:
        """Stop the thread pool (it is recreated on next use)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- keys ------------------------------------------------------------------------------

    def full(self, key: str) -> str:
        """The bucket key of the backend key ``key`` (validated)."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def full_prefix(self, prefix: str) -> str:
        if prefix:
            validate_key(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        return root + prefix

    def relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    # -- requests --------------------------------------------------------------------------

    def error(self, e: BaseException, op: str, key: str | None, full_key: str) -> BackendError:
        """``e`` (a botocore error) as the :class:`BackendError` to raise ``from e``."""
        return translate(e, op=op, bucket=self.bucket, full_key=full_key, key=key, endpoint=self.endpoint)

    def call(self, op: str, key: str | None, full_key: str, **kwargs: Any) -> Any:
        """``client.<op>(Bucket=..., **kwargs)``, counted, with errors translated."""
        self.stats.incr(op)
        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self.error(e, op, key, full_key) from e

    def put(self, key: str, full_key: str, body: bytes | bytearray, **conditions: str) -> str:
        """One ``PutObject`` (with ``IfNoneMatch``/``IfMatch`` conditions); the new ETag."""
        return str(self.call("put_object", key, full_key, Key=full_key, Body=body, **conditions)["ETag"])

    def size(self, key: str) -> int:
        """``HeadObject``'s size of ``key``; raises :class:`ObjectNotFound`."""
        full = self.full(key)
        return int(self.call("head_object", key, full, Key=full)["ContentLength"])
