"""A flaky S3 for the chaos tests: a threaded HTTP proxy on 127.0.0.1 between recllm's S3 client and moto's
server that fails a seeded fraction of requests with HTTP 500, HTTP 503 or a dropped connection (the request
read, no response sent). A failed request never reaches moto, so it has no effect there."""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "drop")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyProxy:
    """``rate``: the fraction of requests that fail, drawn from ``random.Random(seed)`` in arrival order;
    ``fail_after``: from that many forwarded requests on, every request fails (an outage mid-stage)."""

    def __init__(self, upstream_port: int, rate: float = 0.0, seed: int = 0):
        self.upstream_port, self.rate = upstream_port, rate
        self.fail_after: int | None = None
        self.trip: tuple[str, int] | None = None
        """(path prefix, n): every request fails from the n-th PUT under that prefix on (that one included)."""
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter = Counter()
        self.forwarded = 0
        self.log: list[tuple[str, str]] = []
        """(method, path) of every request forwarded to moto, in order."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, method: str, path: str) -> str | None:
        with self.lock:
            if self.trip is not None and method == "PUT" and path.startswith(self.trip[0]):
                self.trip = (self.trip[0], self.trip[1] - 1)
                if self.trip[1] <= 0:
                    self.fail_after = self.forwarded
            if self.fail_after is not None and self.forwarded >= self.fail_after:
                fault = FAULTS[sum(self.faults.values()) % len(FAULTS)]
            elif self.rng.random() < self.rate:
                fault = self.rng.choice(FAULTS)
            else:
                self.forwarded += 1
                return None
            self.faults[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault is None:
                    proxy.log.append((self.command, self.path))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None:
                    message = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>" \
                        if fault == "500" else b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response has no body, whatever its length says
                        self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = response.getheader("Content-Length")
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
