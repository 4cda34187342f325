"""A fault-injecting reverse proxy for an S3 server on loopback: per request, a `503 SlowDown`, a connection
dropped without an answer, or the request passed through untouched; and outages (nothing listens) on demand.

S3 clients sign the Host header they send; the proxy forwards requests byte for byte, Host included, so the
server checks the very signature the client made for the proxy's address.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """Forwards to `upstream`; each request is answered 503 SlowDown with probability `slowdown`, or cut off
    (connection closed, no answer) with probability `drop`. down() stops listening; up() listens again on the
    same port."""

    def __init__(self, upstream: str, slowdown: float = 0.0, drop: float = 0.0, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.slowdown, self.drop = slowdown, drop
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"passed": 0, "slowdown": 0, "dropped": 0}
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.open: set[socket.socket] = set()  # client connections, cut at down() as a stopped server would
        self.up()

    @property
    def endpoint(self) -> str:
        """The URL clients use instead of the upstream's."""
        return f"http://127.0.0.1:{self.port}"

    def fate(self) -> str:
        """What happens to the next request."""
        with self.lock:
            roll = self.random.random()
        return "slowdown" if roll < self.slowdown else "dropped" if roll < self.slowdown + self.drop else "passed"

    def up(self) -> None:
        """Listen (again, on the same port)."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.open.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy.open.discard(self.connection)
                super().finish()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline().strip():  # trailers, then the blank line
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fate = proxy.fate()
                with proxy.lock:
                    proxy.counts[fate] += 1
                if fate == "dropped":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fate == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop listening: clients get `connection refused`, as from a stopped server."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            for connection in list(self.open):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after `seconds`, in the background."""
        self.down()

        def later() -> None:
            time.sleep(seconds)
            self.up()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop for good."""
        self.down()
