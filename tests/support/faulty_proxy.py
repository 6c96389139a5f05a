"""A threaded HTTP reverse proxy that injects S3 faults, for fault tests against a real server.

    proxy = FaultyProxy(server.endpoint_url)
    proxy.add_fault("slowdown", count=2, **UPLOAD_PART)  # first 2 UploadParts get 503 SlowDown
    client = server.client(proxy.url)
    ...
    proxy.close()

Faults: ``"slowdown"`` (503 SlowDown XML), ``"internal"`` (500 InternalError XML), ``"reset"``
(request read, then the connection is reset without an answer) and ``"reset_after"`` (request
forwarded and executed upstream, then the connection is reset — the answer is lost) and
``"truncate"`` (forwarded; the answer's headers and half its body are sent, then a reset). Everything
else is forwarded verbatim, headers (``If-None-Match``, ``If-Match``, signatures) and streamed
bodies included; the ``Host`` header is kept so SigV4 signatures stay valid.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

__all__ = ["COMPLETE_UPLOAD", "CREATE_UPLOAD", "FaultRule", "FaultyProxy", "GET", "PUT_OBJECT", "UPLOAD_PART"]

# request matchers for add_fault(**MATCHER)
UPLOAD_PART: dict[str, Any] = {"method": "PUT", "query_has": ("partNumber", "uploadId")}
COMPLETE_UPLOAD: dict[str, Any] = {"method": "POST", "query_has": ("uploadId",), "query_lacks": ("partNumber",)}
CREATE_UPLOAD: dict[str, Any] = {"method": "POST", "query_has": ("uploads",)}
PUT_OBJECT: dict[str, Any] = {"method": "PUT", "query_lacks": ("partNumber", "uploadId")}
GET: dict[str, Any] = {"method": "GET"}

_FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
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
_CHUNK = 256 * 1024


@dataclass
class FaultRule:
    kind: str
    count: int
    method: str | None = None
    query_has: tuple[str, ...] = ()
    query_lacks: tuple[str, ...] = ()
    path_contains: str | None = None
    injected: int = 0

    def matches(self, method: str, path: str, query: dict[str, list[str]]) -> bool:
        return (
            (self.method is None or self.method == method)
            and all(q in query for q in self.query_has)
            and not any(q in query for q in self.query_lacks)
            and (self.path_contains is None or self.path_contains in path)
        )


@dataclass(frozen=True)
class Record:
    method: str
    path: str
    query: tuple[str, ...]
    fault: str | None


class FaultyProxy:
    """Reverse proxy on a free loopback port in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self.records: list[Record] = []
        self.faults: Counter[str] = Counter()
        self.body_bytes: Counter[str] = Counter()  # request body bytes received, per HTTP method
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)
        self._thread.start()

    def add_fault(
        self,
        kind: str,
        count: int,
        *,
        method: str | None = None,
        query_has: tuple[str, ...] = (),
        query_lacks: tuple[str, ...] = (),
        path_contains: str | None = None,
    ) -> FaultRule:
        """Answer the next ``count`` matching requests with fault ``kind``."""
        if kind not in (*_FAULTS, "reset", "reset_after", "truncate"):
            raise ValueError(f"unknown fault {kind!r}")
        rule = FaultRule(kind, count, method, tuple(query_has), tuple(query_lacks), path_contains)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.records.clear()
            self.faults.clear()

    def count(
        self,
        *,
        method: str | None = None,
        query_has: tuple[str, ...] = (),
        query_lacks: tuple[str, ...] = (),
        path_contains: str | None = None,
        faulted: bool | None = None,
    ) -> int:
        """How many requests so far matched (and were / were not faulted)."""
        probe = FaultRule("", 0, method, tuple(query_has), tuple(query_lacks), path_contains)
        with self._lock:
            return sum(
                1
                for r in self.records
                if probe.matches(r.method, r.path, dict.fromkeys(r.query, [""]))
                and (faulted is None or (r.fault is not None) == faulted)
            )

    @property
    def total_faults(self) -> int:
        with self._lock:
            return sum(self.faults.values())

    def _decide(self, method: str, path: str, query: dict[str, list[str]]) -> str | None:
        with self._lock:
            fault = None
            for rule in self._rules:
                if rule.injected < rule.count and rule.matches(method, path, query):
                    rule.injected += 1
                    fault = rule.kind
                    self.faults[fault] += 1
                    break
            self.records.append(Record(method, path, tuple(sorted(query)), fault))
            return fault

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        _upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _body_chunks(self) -> Any:
            """The request body as it arrives (Content-Length or chunked transfer coding)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    data = self.rfile.read(size)
                    self._count(len(data))
                    yield data
                    self.rfile.readline()
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ConnectionError("client closed mid-body")
                remaining -= len(chunk)
                self._count(len(chunk))
                yield chunk

        def _count(self, n: int) -> None:
            with proxy._lock:
                proxy.body_bytes[self.command] += n

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _send_fault(self, kind: str) -> None:
            status, code, message = _FAULTS[kind]
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><Resource>{escape(urlsplit(self.path).path)}</Resource>"
                "<RequestId>faulty-proxy</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, method: str) -> http.client.HTTPResponse:
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            for attempt in (1, 2):  # a stale keep-alive upstream connection gets one reconnect
                if self._upstream is None:
                    self._upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                conn = self._upstream
                try:
                    conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP:
                            conn.putheader(name, value)
                    if chunked:
                        conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    self._pending_body = self._body_chunks() if attempt == 1 else iter(())
                    for chunk in self._pending_body:
                        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                    return conn.getresponse()
                except (ConnectionError, http.client.HTTPException, OSError):
                    conn.close()
                    self._upstream = None
                    if attempt == 2 or method not in ("GET", "HEAD", "DELETE"):
                        raise
            raise AssertionError("unreachable")

        def _handle(self) -> None:
            method = self.command
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            fault = proxy._decide(method, parts.path, query)
            if fault in _FAULTS or fault == "reset":
                for _ in self._body_chunks():
                    pass
                if fault == "reset":
                    self._reset()
                else:
                    self._send_fault(fault)
                return
            try:
                resp = self._forward(method)
            except (ConnectionError, http.client.HTTPException, OSError):
                self._reset()
                return
            if fault == "reset_after":
                resp.read()
                self._reset()
                return
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            no_body = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            if length is None and not no_body:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                resp.read()
                return
            if fault == "truncate":
                body = resp.read()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._reset()
                return
            while chunk := resp.read(_CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if length is None else chunk)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
            if resp.will_close:
                self._upstream = None

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
