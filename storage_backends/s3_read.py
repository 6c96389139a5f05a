"""Reads of the S3 backend: ranged GETs, fetched in parallel, of one :class:`S3Bucket`.

A GET whose body breaks off mid-stream is fetched again (pinned to the first answer's ETag):
botocore's retries end once the response headers have arrived.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage_backends.s3_bucket import S3Bucket
from storage_backends.s3_util import BODY_READ_ERRORS, error_code, http_status, parse_total_size, split_span

log = logging.getLogger(__name__)


def _open(s3: S3Bucket, key: str, full: str, start: int, end: int, if_match: str | None) -> Any | None:
    """Send a GET of bytes ``[start, end)``; the response with its body unread, or None when
    ``start`` is at or past the end (416: an empty object included)."""
    kwargs: dict[str, Any] = {"Key": full, "Range": f"bytes={start}-{end - 1}"}
    if if_match:
        kwargs["IfMatch"] = if_match
    s3.stats.incr("get_object")
    try:
        return s3.client.get_object(Bucket=s3.bucket, **kwargs)
    except (ClientError, BotoCoreError) as e:
        if http_status(e) == 416 or error_code(e) == "InvalidRange":
            return None
        raise s3.error(e, "GetObject", key, full) from e


def _read_all(resp: Any) -> bytes:
    """The whole body, through botocore's StreamingBody (which checks Content-Length and turns
    a broken stream into ResponseStreamingError; its ``with`` form hands out the raw stream)."""
    body = resp["Body"]
    try:
        return body.read()  # type: ignore[no-any-return]
    finally:
        body.close()


def _body(resp: Any, start: int, end: int) -> tuple[bytes, int]:
    """Read a ranged GET's body: ``(data, object size)``."""
    data = _read_all(resp)
    total = parse_total_size(resp.get("ContentRange"))
    if total is None:  # a store that ignored Range and sent the whole object
        total, data = len(data), data[start:end]
    return data, total


def get_range(
    s3: S3Bucket, key: str, full: str, start: int, end: int, if_match: str | None = None
) -> tuple[bytes, int | None, str]:
    """GET bytes ``[start, end)``: ``(data, object size, etag)``; ``(b"", None, "")`` when
    ``start`` is at or past the end. A body that breaks off is fetched again."""
    for attempt in range(1, s3.max_attempts + 1):
        resp = _open(s3, key, full, start, end, if_match)
        if resp is None:
            return b"", None, ""
        try:
            data, total = _body(resp, start, end)
        except BODY_READ_ERRORS as e:
            if attempt == s3.max_attempts:
                raise s3.error(e, "GetObject (reading body)", key, full) from e
            log.warning("s3://%s/%s: GET body broke off (%s), retrying", s3.bucket, full, type(e).__name__)
            if_match = resp["ETag"]
            continue
        return data, total, str(resp.get("ETag", ""))
    raise AssertionError("unreachable")


def get_into(s3: S3Bucket, key: str, full: str, start: int, out: memoryview, if_match: str | None = None) -> int:
    """GET ``len(out)`` bytes at ``start`` straight into ``out`` (the body is read with
    ``readinto``: no bytes object of the whole range, no join); the count read, short at the end
    of the object, 0 at or past it. A body that breaks off is fetched again, pinned to the
    first answer's ETag."""
    want = len(out)
    for attempt in range(1, s3.max_attempts + 1):
        resp = _open(s3, key, full, start, start + want, if_match)
        if resp is None:
            return 0
        if parse_total_size(resp.get("ContentRange")) is None:  # a store that ignored Range
            data = _read_all(resp)[start : start + want]
            out[: len(data)] = data
            return len(data)
        body = resp["Body"]
        got = 0
        try:
            while got < want:
                # StreamingBody.readinto checks Content-Length when the stream ends
                n = body.readinto(out[got:])
                if not n:
                    break
                got += n
        except BODY_READ_ERRORS as e:
            if attempt == s3.max_attempts:
                raise s3.error(e, "GetObject (reading body)", key, full) from e
            log.warning("s3://%s/%s: GET body broke off (%s), retrying", s3.bucket, full, type(e).__name__)
            if_match = resp["ETag"]
            continue
        finally:
            body.close()
        return got
    raise AssertionError("unreachable")


def read_into(s3: S3Bucket, key: str, start: int, out: memoryview) -> int:
    """``len(out)`` bytes at ``start`` into ``out``, as ``part_size`` GETs in parallel; the
    count read (short at the end of the object)."""
    full = s3.full(key)
    if start < 0:
        raise ValueError(f"invalid range start={start} for {key!r}")
    out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    if not len(out):
        s3.size(key)  # raises ObjectNotFound
        return 0
    pieces = split_span(start, start + len(out), s3.part_size)
    if len(pieces) == 1:
        return get_into(s3, key, full, start, out)
    futures = [s3.executor().submit(get_into, s3, key, full, s, out[s - start : e - start]) for s, e in pieces]
    try:
        counts = [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()
    # pieces past the end of the object read 0, the one the end falls in reads short
    return sum(counts)


def get_whole(s3: S3Bucket, key: str, full: str) -> tuple[bytes, str]:
    """A small object's bytes and ETag with one plain GET (an empty object included); a body
    that breaks off is fetched again."""
    for attempt in range(1, s3.max_attempts + 1):
        s3.stats.incr("get_object")
        try:
            resp = s3.client.get_object(Bucket=s3.bucket, Key=full)
        except (ClientError, BotoCoreError) as e:
            raise s3.error(e, "GetObject", key, full) from e
        try:
            return _read_all(resp), str(resp["ETag"])
        except BODY_READ_ERRORS as e:
            if attempt == s3.max_attempts:
                raise s3.error(e, "GetObject (reading body)", key, full) from e
            log.warning("s3://%s/%s: GET body broke off (%s), retrying", s3.bucket, full, type(e).__name__)
    raise AssertionError("unreachable")


def read(s3: S3Bucket, key: str, start: int = 0, length: int | None = None) -> bytes:
    full = s3.full(key)
    if start < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid range start={start} length={length} for {key!r}")
    if length == 0:
        s3.size(key)  # raises ObjectNotFound
        return b""
    first_end = start + (s3.part_size if length is None else min(length, s3.part_size))
    resp = _open(s3, key, full, start, first_end, None)
    if resp is None:
        return b""
    total = parse_total_size(resp.get("ContentRange"))
    if total is None:  # a store that ignored Range sent the whole object
        data = _read_all(resp)
        return data[start:] if length is None else data[start : start + length]
    stop = total if length is None else min(start + length, total)
    first_stop = min(first_end, stop)
    etag = str(resp.get("ETag", "")) or None
    # the rest goes out as soon as the first answer's headers tell the size, before its body is read
    pieces = split_span(first_stop, stop, s3.part_size) if first_stop < stop else []
    rest = [s3.executor().submit(get_range, s3, key, full, s, e, etag) for s, e in pieces]
    try:
        try:
            first = _body(resp, start, first_end)[0]
        except BODY_READ_ERRORS:
            first = get_range(s3, key, full, start, first_stop, etag)[0]
        return b"".join([first, *(f.result()[0] for f in rest)]) if rest else first
    finally:
        for f in rest:
            f.cancel()
