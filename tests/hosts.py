"""Loopback hosts for the politeness tests: each a server on its own address of 127.0.0.0/8 that records every
request's time, how many it served at once, and whether a client closed the connection before the body."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Answer:
    """A scripted answer: status, headers, body; hold: seconds the request is held before the answer (so that
    concurrent requests overlap); wait_before_body: send the headers, then wait this long for the client to close."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hold: float = 0.0
    wait_before_body: float = 0.0


class Host:
    """One host: a threaded HTTP server on address:port answering from answer(path, n) (n: that path's hits)."""

    def __init__(self, address: str, answer: Callable[[str, int], Answer], robots: str | None = None) -> None:
        """robots: the /robots.txt text (None: 404); robots_status overrides its status."""
        self.address, self.answer, self.robots = address, answer, robots
        self.robots_status: int | None = None
        self.lock = threading.Lock()
        self.active = self.most_active = 0  # requests being answered (see done() below)
        self.in_hand = 0  # handler threads still running, whatever the client has seen
        self.requests: list[tuple[float, str]] = []  # (monotonic time, path), robots.txt included
        self.closed_before_body: list[str] = []
        self.hits: dict[str, int] = {}
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go in two writes: without this, Nagle holds the body for the client's ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                with host.lock:
                    host.requests.append((time.monotonic(), path))
                    host.hits[path] = n = host.hits.get(path, 0) + 1
                    host.active += 1
                    host.in_hand += 1
                    host.most_active = max(host.most_active, host.active)
                ended = False

                def done() -> None:
                    # Counted from arrival to just before the response's last byte: inside the client's own hold
                    # on its slot, so a count above the limit is the client's doing, never this thread's lag.
                    nonlocal ended
                    with host.lock:
                        if not ended:
                            host.active -= 1
                            ended = True

                try:
                    if path == "/robots.txt":
                        body = (host.robots or "").encode()
                        reply = Answer(host.robots_status or (200 if host.robots is not None else 404), body,
                                       {"Content-Type": "text/plain"})
                    else:
                        reply = host.answer(path, n)
                    time.sleep(reply.hold)
                    self._send(path, reply, done)
                finally:
                    done()
                    with host.lock:
                        host.in_hand -= 1

            def _send(self, path: str, reply: Answer, done: Callable[[], None]) -> None:
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    if not reply.body or reply.wait_before_body:
                        done()  # the headers may be all the client wants: it can let go once they leave
                    self.end_headers()
                    self.wfile.flush()
                    if reply.wait_before_body:
                        # The client closing now reads as EOF here: it never wanted the body.
                        readable, _, _ = select.select([self.connection], [], [], reply.wait_before_body)
                        if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                            with host.lock:
                                host.closed_before_body.append(path)
                            self.close_connection = True
                            return
                    done()  # the client lets go of its slot on the last byte, maybe before this thread runs again
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        """A URL of this host."""
        return f"http://{self.address}:{self.port}{path}"

    def times(self, prefix: str = "/") -> list[float]:
        """When requests whose path starts with prefix arrived (robots.txt left out unless asked for)."""
        with self.lock:
            return [t for t, p in self.requests if p.startswith(prefix) and (prefix == "/robots.txt"
                                                                             or p != "/robots.txt")]

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no request is in hand: a client that closed returns before this server has noticed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.in_hand == 0:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"{self.address}: {self.in_hand} requests still in hand after {timeout} s")

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()
