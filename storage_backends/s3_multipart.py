"""The S3 streaming writer: one ``put_object`` for small objects, a parallel multipart upload
for large ones, with bounded memory and a reserved head patched in at commit.

With a reserved head, the first part (which starts with it) stays in memory and is uploaded
last, in ``commit(head)``, with the head filled in: S3 assembles parts by number, not by upload
order. Without one (``reserve_head=0``: uncompressed shards, whose header is written first)
part 1 goes out as soon as it is full, like every other part, so the upload's tail after the
last byte is one part, not two. Every part but the last keeps ``part_size`` bytes (stores such
as Cloudflare R2 refuse multipart uploads whose parts differ in size).
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future, wait
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends.errors import BackendError
from storage_backends.s3_bucket import S3Bucket
from storage_backends.s3_util import MAX_PARTS, error_code

log = logging.getLogger(__name__)

_OPEN, _COMMITTED, _ABORTED = "open", "committed", "aborted"


class S3ObjectWriter:
    """Streams one object to S3. Obtain it from :meth:`S3Backend.open_writer`.

    Memory stays below ``max(multipart_threshold, (max_concurrency + 2) * part_size)``: the
    first part when kept for a reserved head, at most ``max_concurrency`` parts in flight
    (``write()`` blocks while that many are uploading) and the part being filled.
    ``max_buffered_bytes`` records the peak. Any failure aborts the multipart upload, so nothing partial is left behind.
    """

    def __init__(self, s3: S3Bucket, key: str, full_key: str, reserve_head: int) -> None:
        if reserve_head < 0:
            raise ValueError(f"reserve_head must be >= 0, got {reserve_head}")
        self.key = key
        self._b = s3
        self._full = full_key
        self._reserve = reserve_head
        self._part_size = s3.part_size
        self._first_size = max(s3.part_size, reserve_head)
        self._threshold = max(s3.multipart_threshold, self._first_size)
        self._buf = bytearray(reserve_head)
        self._first: bytearray | None = None
        self._size = reserve_head
        self._next_part = 2
        self._pending: dict[int, Future[str]] = {}
        self._etags: dict[int, str] = {}
        self._slots = threading.Semaphore(s3.max_concurrency)
        self._lock = threading.Lock()
        self._inflight_bytes = 0
        self._error: BaseException | None = None
        self._state = _OPEN
        self.upload_id: str | None = None
        """The multipart upload's id once one was started (objects >= the threshold)."""
        self.max_buffered_bytes = len(self._buf)
        """Peak bytes held in memory by this writer (kept first part + in flight + filling)."""
        self.parts_uploaded = 0

    # -- public API -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; blocks while ``max_concurrency`` parts are already uploading."""
        self._check_open()
        mv = memoryview(data).cast("B")
        off, n = 0, len(mv)
        try:
            while off < n:
                cap = self._threshold if self.upload_id is None else self._part_size
                take = min(cap - len(self._buf), n - off)
                self._buf += mv[off : off + take]
                off += take
                self._size += take
                self._note_buffered()
                if len(self._buf) >= cap:
                    if self.upload_id is None:
                        self._start_multipart()
                    else:
                        part, self._buf = self._buf, bytearray()
                        self._submit(self._take_part_number(), part)
        except BaseException:
            self.abort()
            raise

    def commit(self, head: bytes = b"") -> int:
        """Patch ``head`` into the reserved bytes, finish the upload and return the object size."""
        self._check_open()
        if len(head) != self._reserve:
            self.abort()
            raise ValueError(
                f"commit() of {self.key!r} got a {len(head)}-byte head, expected reserve_head={self._reserve}"
            )
        try:
            if self.upload_id is None:
                self._buf[: self._reserve] = head
                self._b.put(self.key, self._full, self._buf)
            else:
                self._finish_multipart(head)
        except BaseException:
            self.abort()
            raise
        self._state = _COMMITTED
        self._buf, self._first = bytearray(), None
        return self._size

    def abort(self) -> None:
        """Discard everything: cancel queued parts, wait for running ones, abort the upload.
        Never raises; an upload that could not be aborted is logged and left for ``gc``."""
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        for fut in self._pending.values():
            fut.cancel()
        wait(list(self._pending.values()))
        self._pending.clear()
        self._buf, self._first = bytearray(), None
        if self.upload_id is not None:
            try:
                self._b.stats.incr("abort_multipart_upload")
                self._b.client.abort_multipart_upload(Bucket=self._b.bucket, Key=self._full, UploadId=self.upload_id)
                log.debug("aborted multipart upload of s3://%s/%s", self._b.bucket, self._full)
            except (ClientError, BotoCoreError) as e:
                if error_code(e) != "NoSuchUpload":
                    log.warning(
                        "could not abort multipart upload %s of s3://%s/%s (%s); "
                        "`dist-ckpt gc` or abort_uploads() will remove it",
                        self.upload_id,
                        self._b.bucket,
                        self._full,
                        error_code(e),
                    )

    def __enter__(self) -> S3ObjectWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self._state == _OPEN:
            self.abort()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise ValueError(f"writer of {self.key!r} is already {self._state}")

    def _note_buffered(self) -> None:
        with self._lock:
            held = len(self._buf) + self._inflight_bytes + (len(self._first) if self._first is not None else 0)
            self.max_buffered_bytes = max(self.max_buffered_bytes, held)

    def _take_part_number(self) -> int:
        num = self._next_part
        if num > MAX_PARTS:
            raise BackendError(
                f"s3://{self._b.bucket}/{self._full} needs more than {MAX_PARTS} parts of "
                f"{self._part_size} bytes; open the backend with a larger part_size",
                key=self.key,
                code="TooManyParts",
            )
        self._next_part += 1
        return num

    def _start_multipart(self) -> None:
        b = self._b
        b.stats.incr("create_multipart_upload")
        try:
            resp = b.client.create_multipart_upload(Bucket=b.bucket, Key=self._full)
        except (ClientError, BotoCoreError) as e:
            raise b.error(e, "CreateMultipartUpload", self.key, self._full) from e
        self.upload_id = resp["UploadId"]
        log.debug("started multipart upload of s3://%s/%s", b.bucket, self._full)
        buf = self._buf
        if len(buf) == self._first_size:
            first, self._buf = buf, bytearray()
            self._keep_or_send_first(first)
            return
        first = buf[: self._first_size]
        rest = memoryview(buf)[self._first_size :]
        self._buf = bytearray()
        self._keep_or_send_first(first)
        while len(rest) >= self._part_size:
            self._submit(self._take_part_number(), bytearray(rest[: self._part_size]))
            rest = rest[self._part_size :]
        self._buf = bytearray(rest)
        rest.release()

    def _keep_or_send_first(self, first: bytearray) -> None:
        """Part 1 waits for ``commit(head)`` only when a head is reserved in it."""
        if self._reserve:
            self._first = first
        else:
            self._submit(1, first)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, num: int, part: bytearray) -> None:
        self._raise_if_failed()
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error
        with self._lock:
            self._inflight_bytes += len(part)
        self._note_buffered()
        fut = self._b.executor().submit(self._upload_part, num, part)
        self._pending[num] = fut
        fut.add_done_callback(functools.partial(self._part_done, num, len(part)))

    def _part_done(self, num: int, nbytes: int, fut: Future[str]) -> None:
        with self._lock:
            self._inflight_bytes -= nbytes
            if fut.cancelled():
                pass
            elif fut.exception() is not None:
                self._error = self._error or fut.exception()
            else:
                self._etags[num] = fut.result()
                self.parts_uploaded += 1
        self._slots.release()

    def _upload_part(self, num: int, body: bytearray) -> str:
        b = self._b
        b.stats.incr("upload_part")
        try:
            resp = b.client.upload_part(
                Bucket=b.bucket, Key=self._full, UploadId=self.upload_id, PartNumber=num, Body=body
            )
        except (ClientError, BotoCoreError) as e:
            raise b.error(e, f"UploadPart {num}", self.key, self._full) from e
        return str(resp["ETag"])

    def _finish_multipart(self, head: bytes) -> None:
        b = self._b
        if self._buf:
            last, self._buf = self._buf, bytearray()
            self._submit(self._take_part_number(), last)
        first = self._first
        if self._reserve:
            assert first is not None
            first[: self._reserve] = head
            self._first = None  # from here on it is counted as in flight
            self._submit(1, first)
        wait(list(self._pending.values()))
        self._raise_if_failed()
        self._pending.clear()
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        b.stats.incr("complete_multipart_upload")
        try:
            b.client.complete_multipart_upload(
                Bucket=b.bucket, Key=self._full, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            )
        except (ClientError, BotoCoreError) as e:
            if error_code(e) == "NoSuchUpload" and self._already_completed(len(parts)):
                log.info("s3://%s/%s: a retried CompleteMultipartUpload had already succeeded", b.bucket, self._full)
            else:
                raise b.error(e, "CompleteMultipartUpload", self.key, self._full) from e
        log.debug("completed s3://%s/%s: %d parts, %d bytes", b.bucket, self._full, len(parts), self._size)

    def _already_completed(self, nparts: int) -> bool:
        """After a NoSuchUpload on complete (a retry whose first attempt went through): is the
        object there with our size and a multipart ETag of our part count?"""
        try:
            head = self._b.client.head_object(Bucket=self._b.bucket, Key=self._full)
        except (ClientError, BotoCoreError):
            return False
        etag = str(head.get("ETag", "")).strip('"')
        return int(head.get("ContentLength", -1)) == self._size and etag.endswith(f"-{nparts}")
