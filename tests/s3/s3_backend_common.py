"""Shared pieces of the S3Backend tests: sizes, the bucket of a URI, its unfinished uploads, a
backend that talks through the faulty HTTP proxy."""

from __future__ import annotations

from support.faulty_proxy import FaultyProxy
from support.s3server import S3Server, make_s3_backend

from storage_backends.s3 import S3Backend

MiB = 1024 * 1024
PART = 5 * MiB


def bucket_name(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def open_uploads(server: S3Server, bucket: str) -> list[dict]:
    return server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) or []


def proxied_backend(s3_server: S3Server, s3_uri: str, proxy: FaultyProxy, max_attempts: int = 3) -> S3Backend:
    return make_s3_backend(
        s3_server,
        s3_uri,
        endpoint_url=proxy.url,
        max_attempts=max_attempts,
        part_size=PART,
        multipart_threshold=PART,
        max_concurrency=4,
    )
