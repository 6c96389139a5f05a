"""The pytest fixtures of the real S3 servers of :mod:`support.s3server` (imported by
tests/conftest.py): ``seaweedfs_server`` / ``moto_s3_server`` (session), ``s3_server``,
``s3_env``, ``s3_uri``, and ``on_every_s3_implementation`` for a module's
``pytest_generate_tests``. See :mod:`support.s3server` for what each gives."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.s3server import S3_IMPLEMENTATIONS, S3Server, S3ServerError, start_moto, start_seaweedfs

__all__ = ["moto_s3_server", "on_every_s3_implementation", "s3_env", "s3_server", "s3_uri", "seaweedfs_server"]


def _serve(start: Any, workdir: Path) -> Iterator[S3Server]:
    try:
        server = start(workdir)
    except S3ServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from _serve(start_seaweedfs, tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from _serve(start_moto, tmp_path_factory.mktemp("moto"))


@pytest.fixture
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """SeaweedFS, or the implementation a test is parametrized with (``on_every_s3_implementation``)."""
    name = getattr(request, "param", "seaweedfs")
    return request.getfixturevalue({"seaweedfs": "seaweedfs_server", "moto": "moto_s3_server"}[name])


def on_every_s3_implementation(metafunc: pytest.Metafunc) -> None:
    """Use as a test module's ``pytest_generate_tests``: every test of it that uses an S3 server
    (``s3_server``, ``s3_env``, ``s3_uri``) runs once on SeaweedFS and once on moto."""
    if "s3_server" in metafunc.fixturenames:
        metafunc.parametrize("s3_server", S3_IMPLEMENTATIONS, indirect=True)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3's standard configuration (this process and its children) at the server."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server


@pytest.fixture
def s3_uri(s3_env: S3Server) -> Iterator[str]:
    """A fresh, empty bucket for this test: ``s3://<bucket>/run``; deleted afterwards."""
    bucket = s3_env.create_bucket()
    yield f"s3://{bucket}/run"
    if s3_env.name == "moto":  # keeps everything in its memory and deletes empty buckets only
        from support.moto_server import reset_moto_server

        reset_moto_server(s3_env)
        return
    try:
        s3_env.client().delete_bucket(Bucket=bucket)  # SeaweedFS deletes non-empty buckets too
    except Exception:  # noqa: BLE001 - best effort; the server's directory goes away anyway
        pass
