"""A fault-injecting HTTP reverse proxy, put between s3fs and the S3 server to exercise retries for real.

Faults are decided before anything is forwarded, so a failed request never has a side effect
upstream: a retried PUT cannot create the object twice, and a test can count exactly what happened.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# (method, path with query, headers) -> whether this request may get a fault.
FaultFilter = Callable[[str, str, Mapping[str, str]], bool]

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
}  # fmt: skip
# Not copied onto the upstream request: the proxy has read the body and sets the framing itself.
_NOT_FORWARDED = _HOP_BY_HOP | {"expect", "content-length"}
_CHUNK = 1 << 16

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)
_INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)


class FaultProxy:
    """`with FaultProxy(s3.endpoint, error_rate=0.1) as p:` then point s3fs at `p.endpoint`.

    Per request, in this order and from one seeded stream: with `error_rate` answer 503 SlowDown or
    500 InternalError (half each), with `reset_rate` close the connection with a TCP reset and no
    response, with `delay_rate` wait `delay_s` before forwarding. `stats` counts what was done;
    `fault_filter` limits faults to matching requests (e.g. only CopyObject).
    """

    def __init__(
        self,
        upstream: str,
        *,
        error_rate: float = 0.0,
        reset_rate: float = 0.0,
        delay_rate: float = 0.0,
        delay_s: float = 0.2,
        seed: int = 0,
        fault_filter: FaultFilter | None = None,
    ) -> None:
        up = urlsplit(upstream)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = up.hostname
        self.upstream_port = up.port or 80
        self.error_rate = error_rate
        self.reset_rate = reset_rate
        self.delay_rate = delay_rate
        self.delay_s = delay_s
        self.fault_filter = fault_filter
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_options(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """`base` s3fs options with the endpoint replaced by this proxy's."""
        opts = dict(base)
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": self.endpoint}
        return opts

    def _decide(self, method: str, path: str, headers: Mapping[str, str]) -> str:
        with self._lock:
            self.stats["requests"] += 1
            if self.fault_filter is not None and not self.fault_filter(method, path, headers):
                return "forward"
            # Always draw all four, so one rate does not shift the others' sequence.
            e, r, d, kind = (self._rng.random() for _ in range(4))
            if e < self.error_rate:
                action = "slowdown" if kind < 0.5 else "internal"
            elif r < self.reset_rate:
                action = "reset"
            elif d < self.delay_rate:
                action = "delay"
            else:
                action = "forward"
            if action != "forward":
                self.stats[action] += 1
            return action

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_all()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """Tracks open client sockets so `stop` can close idle keep-alive connections at once."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (they do, on faults and timeouts) is normal here; anything else is not."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_all(self) -> None:
        with self.sockets_lock:
            socks = list(self.open_sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore/aiohttp expect
    timeout = 60  # idle keep-alive connections end on their own
    owner: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        owner = self.owner
        headers = {k.lower(): v for k, v in self.headers.items()}
        action = owner._decide(self.command, self.path, headers)
        if action == "reset":
            self._reset()
            return
        if action in ("slowdown", "internal"):
            for _ in self._request_body(headers):
                pass  # drain, so the keep-alive connection stays usable
            status, payload = (503, _SLOWDOWN) if action == "slowdown" else (500, _INTERNAL)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if action == "delay":
            threading.Event().wait(owner.delay_s)
        self._forward(headers)

    def _reset(self) -> None:
        """Abort with RST: the client sees 'connection reset' / 'server disconnected', no response."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _request_body(self, headers: Mapping[str, str]) -> Iterator[bytes]:
        """The request body with HTTP chunked framing removed (aws-chunked content stays intact)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(headers.get("content-length", "0") or 0)
            while remaining > 0:
                data = self.rfile.read(min(_CHUNK, remaining))
                if not data:
                    raise ConnectionError("client closed during request body")
                remaining -= len(data)
                yield data

    def _forward(self, headers: Mapping[str, str]) -> None:
        owner = self.owner
        up = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in _NOT_FORWARDED:
                    up.putheader(key, value)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = b"".join(self._request_body(headers))  # rare (botocore sends lengths): buffer it
                up.putheader("Content-Length", str(len(body)))
                up.endheaders(body)
            else:
                if "content-length" in headers:
                    up.putheader("Content-Length", headers["content-length"])
                up.endheaders()
                for data in self._request_body(headers):  # streamed: large bodies never sit in memory
                    up.send(data)
            resp = up.getresponse()
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            chunked = length is None and not no_body
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                return
            while data := resp.read(_CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            up.close()
