"""moto's standalone S3 server (``moto_server`` from ``moto[server]``): a second, independent S3
implementation for the tests, a real HTTP endpoint on loopback (its state lives in its memory).
Start it through :func:`support.s3server.start_moto` or the ``moto_s3_server`` fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from support.s3server import ACCESS_KEY, SECRET_KEY, S3Server, S3ServerError, _free_ports, _wait_ready


def find_moto_server() -> str:
    """``moto_server``: next to this Python (the venv's bin, from ``moto[server]``), else on PATH."""
    for c in (Path(sys.executable).parent / "moto_server", Path(sys.prefix) / "bin" / "moto_server"):
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("moto_server")
    if found:
        return found
    raise S3ServerError(
        "`moto_server` not found: install the test extra (`pip install -e '.[test]'`, which brings moto[server])"
    )


def start_moto_server(workdir: Path, *, timeout: float = 60.0, tries: int = 3) -> S3Server:
    """Start moto's standalone S3 server (a real HTTP endpoint; state in its memory) on a free
    loopback port and wait until it stores objects. It accepts any credentials."""
    from importlib.metadata import version

    moto_server = find_moto_server()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "moto.log"
    error: S3ServerError | None = None
    for attempt in range(tries):
        port = _free_ports(1)[0]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [moto_server, "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                start_new_session=True,
            )
        server = S3Server(
            f"http://127.0.0.1:{port}",
            ACCESS_KEY,
            SECRET_KEY,
            workdir,
            log_path,
            proc,
            {"s3": port},
            name="moto",
            version=f"moto {version('moto')}",
        )
        try:
            _wait_ready(server, timeout)
            return server
        except S3ServerError as e:
            server.stop(timeout=2)
            error = S3ServerError(
                f"moto_server failed to start (try {attempt + 1}/{tries}): {e}\n"
                f"--- {log_path} (tail) ---\n{server.log_tail()}"
            )
            if "in use" not in server.log_tail(200):
                break
    assert error is not None
    raise error


def reset_moto_server(server: S3Server) -> None:
    """Forget every bucket and object (moto's ``/moto-api/reset``): frees its memory."""
    request = urllib.request.Request(f"{server.endpoint_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=30).close()
