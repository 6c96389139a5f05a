"""An HTTP reverse proxy that makes a real S3 server behave like one that ignores conditional
writes: it drops ``If-None-Match`` and ``If-Match`` from every request, as some S3-compatible
servers and gateways do, and forwards the rest.

    with StrippingProxy(server.endpoint_url, server.access_key, server.secret_key) as proxy:
        client = server.client(proxy.url)   # conditional writes now always "succeed"
        ...
    assert proxy.stripped["If-None-Match"] > 0

The headers are covered by the request's SigV4 signature, so a request that loses one is signed
again with the same credentials (botocore's own signer) before it is forwarded; every other
request goes through byte for byte. Request bodies are read whole (the tests send small ones).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

__all__ = ["STRIPPED_HEADERS", "StrippingProxy"]

STRIPPED_HEADERS = ("If-None-Match", "If-Match")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_RESIGNED = {"authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
_CHUNK = 256 * 1024


class StrippingProxy:
    """Reverse proxy on a free loopback port in front of ``upstream`` (``http://host:port``),
    re-signing with ``access_key``/``secret_key`` in ``region`` what it changed."""

    @classmethod
    def before(cls, server: Any, **kwargs: Any) -> StrippingProxy:
        """A proxy in front of a :class:`support.s3server.S3Server`, with its credentials."""
        return cls(server.endpoint_url, server.access_key, server.secret_key, server.region, **kwargs)

    def __init__(
        self,
        upstream: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        headers: tuple[str, ...] = STRIPPED_HEADERS,
    ) -> None:
        parts = urlsplit(upstream)
        self.headers = tuple(headers)
        """The headers this proxy drops (both by default; one, to fake a server missing one guarantee)."""
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.credentials = Credentials(access_key, secret_key)
        self.region = region
        self.stripped: Counter[str] = Counter()
        """How many requests lost each header."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="stripping-proxy", daemon=True)
        self._thread.start()

    def strip(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
        """The headers to forward: unchanged, or without the conditional ones and signed again."""
        dropped = [name for name, _ in headers if name.lower() in {h.lower() for h in self.headers}]
        if not dropped:
            return headers
        with self._lock:
            self.stripped.update(next(h for h in self.headers if h.lower() == d.lower()) for d in dropped)
        kept = {name: value for name, value in headers if name.lower() not in {d.lower() for d in dropped} | _RESIGNED}
        host = next(value for name, value in headers if name.lower() == "host")
        request = AWSRequest(method=method, url=f"http://{host}{path}", headers=kept, data=body)
        S3SigV4Auth(self.credentials, "s3", self.region).add_auth(request)
        return list(request.headers.items())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StrippingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_handler(proxy: StrippingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()
            headers = [(n, v) for n, v in self.headers.items() if n.lower() not in _HOP_BY_HOP]
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers = [(n, v) for n, v in headers if n.lower() != "content-length"] + [
                    ("Content-Length", str(len(body)))
                ]
            headers = proxy.strip(self.command, self.path, headers, body)
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304)
            if not no_body:
                self.send_header("Content-Length", str(len(data)))
            elif resp.getheader("Content-Length") is not None:
                self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            self.end_headers()
            if not no_body:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
