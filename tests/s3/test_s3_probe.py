"""The start-up probe of an S3 bucket (storage_backends.s3_probe), on SeaweedFS and on moto's
server: both enforce ``If-None-Match: *`` and ``If-Match``; behind a proxy that drops either
header (tests/support/stripping_proxy.py) the probe names exactly the guarantee that is gone;
a bucket that does not exist is named as such; nothing is left behind."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.config import Config
from support.s3_fixtures import on_every_s3_implementation as pytest_generate_tests  # noqa: F401
from support.s3server import SCOPED_ACCESS_KEY, SCOPED_BUCKET, SCOPED_SECRET_KEY, S3Server, make_s3_backend
from support.stripping_proxy import STRIPPED_HEADERS, StrippingProxy

from storage_backends import BackendError, write_guarantees
from storage_backends.guarantees import COMPARE_AND_SWAP, CREATE_IF_ABSENT, PROBE_PREFIX
from storage_backends.local import LocalBackend
from storage_backends.s3 import S3Backend


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def _objects(server: S3Server, uri: str) -> list[str]:
    return [o["Key"] for o in server.client().list_objects_v2(Bucket=_bucket(uri)).get("Contents", []) or []]


def test_both_guarantees_are_enforced_and_the_probe_runs_once(s3_server: S3Server, s3_uri: str) -> None:
    backend = make_s3_backend(s3_server, s3_uri)
    found = write_guarantees(backend)
    assert found.enforced and found.probed and found.missing == ()
    assert f"bucket {_bucket(s3_uri)!r}" in found.where and s3_server.endpoint_url in found.where
    assert backend.stats["put_object"] == 4 and backend.stats["delete_object"] == 1
    assert _objects(s3_server, s3_uri) == [], "the probe object must be deleted"
    again = make_s3_backend(s3_server, f"{s3_uri}/other-run")  # same endpoint and bucket: cached
    assert write_guarantees(again) == found and again.stats.snapshot() == {}


@pytest.mark.parametrize(
    "dropped", [STRIPPED_HEADERS, ("If-None-Match",), ("If-Match",)], ids=["both", "if-none-match", "if-match"]
)
def test_a_server_ignoring_a_condition_is_detected(s3_server: S3Server, s3_uri: str, dropped: tuple[str, ...]) -> None:
    with StrippingProxy.before(s3_server, headers=dropped) as proxy:
        found = write_guarantees(make_s3_backend(s3_server, s3_uri, endpoint_url=proxy.url))
        assert set(proxy.stripped) == set(dropped), proxy.stripped
    assert found.create_if_absent == ("If-None-Match" not in dropped)
    assert found.compare_and_swap == ("If-Match" not in dropped)
    assert set(found.missing) == {CREATE_IF_ABSENT if h == "If-None-Match" else COMPARE_AND_SWAP for h in dropped}
    assert proxy.url in found.where and not found.enforced
    assert _objects(s3_server, s3_uri) == [], "the probe object must be deleted"


def test_a_missing_bucket_is_named(s3_server: S3Server) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(BackendError) as info:
        write_guarantees(make_s3_backend(s3_server, f"s3://{bucket}/run"))
    msg = str(info.value)
    assert f"bucket {bucket!r} does not exist" in msg and s3_server.endpoint_url in msg, msg
    assert info.value.code == "NoSuchBucket" and ".." not in msg


def test_a_missing_bucket_is_named_with_bucket_scoped_credentials(seaweedfs_server: S3Server) -> None:
    """SeaweedFS answers 403 AccessDenied for any other bucket — also one that does not exist —
    to credentials scoped to one bucket (the case of issue 13). (moto checks no credentials.)"""
    admin = seaweedfs_server.client()
    try:  # the one bucket the scoped credentials may use
        admin.create_bucket(Bucket=SCOPED_BUCKET)
    except admin.exceptions.BucketAlreadyOwnedByYou:
        pass
    scoped = boto3.session.Session().client(
        "s3",
        endpoint_url=seaweedfs_server.endpoint_url,
        aws_access_key_id=SCOPED_ACCESS_KEY,
        aws_secret_access_key=SCOPED_SECRET_KEY,
        region_name=seaweedfs_server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )
    assert write_guarantees(S3Backend.from_uri(f"s3://{SCOPED_BUCKET}/run", client=scoped)).enforced
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(BackendError) as info:
        write_guarantees(S3Backend.from_uri(f"s3://{bucket}/run", client=scoped))
    msg = str(info.value)
    assert f"bucket {bucket!r} does not exist" in msg and info.value.code == "AccessDenied", msg
    # an ordinary request says the same, once, without the doubled period of "Access Denied.."
    with pytest.raises(BackendError) as info:
        S3Backend.from_uri(f"s3://{bucket}/run", client=scoped).write_bytes("k", b"x")
    msg = str(info.value)
    assert ".." not in msg and f"that bucket {bucket!r} exists" in msg and "credentials" in msg, msg


def test_local_backends_are_not_probed(tmp_path) -> None:
    found = write_guarantees(LocalBackend(str(tmp_path)))
    assert found.enforced and not found.probed
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name == PROBE_PREFIX for p in tmp_path.rglob("*"))
