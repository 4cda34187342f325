"""HTTP(S) fetching with timeouts, retries, size and redirect limits, and the private-address guard."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from captioning.config import FetchConfig
from captioning.errors import FetchError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_408", "http_429", "http_500", "http_502",
                               "http_503", "http_504"})


@dataclass(frozen=True)
class Fetched:
    """A fetched body with where it finally came from."""

    url: str
    data: bytes
    content_type: str
    seconds: float


def is_url(source: str) -> bool:
    """True for http(s) URLs, the only sources the fetcher takes."""
    return source.startswith(("http://", "https://"))


def blocked_reason(address: str) -> str | None:
    """Why an IP address may not be fetched by default, or None if it is public."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for name in ("is_loopback", "is_link_local", "is_multicast", "is_private", "is_reserved", "is_unspecified"):
        if getattr(ip, name):
            return name.removeprefix("is_").replace("_", "-")
    return None


class Fetcher:
    """Thread-safe fetcher; each resolved address is checked, then that same address is connected to."""

    def __init__(self, config: FetchConfig | None = None) -> None:
        self.config = config or FetchConfig()
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self._allowed = [ipaddress.ip_network(net, strict=False) for net in self.config.allowed_networks]
        self._lock = threading.Lock()

    def get(self, url: str) -> Fetched:
        """GET url and return its body; raises FetchError with a reason code."""
        start = time.monotonic()
        final, response = self._open(url)
        try:
            data = b"".join(self._stream(url, response, self.config.max_bytes))
        finally:
            response.release_conn()
        return Fetched(final, data, response.headers.get("Content-Type", ""), time.monotonic() - start)

    def download(self, url: str, path: Path, max_bytes: int, max_lines: int | None = None) -> Path:
        """Stream url into path (via path.part, renamed when complete); max_lines stops early for text files."""
        _, response = self._open(url)
        part = path.with_name(path.name + ".part")
        lines = 0
        try:
            with open(part, "wb") as handle:
                for chunk in self._stream(url, response, max_bytes):
                    if max_lines is not None:
                        lines += chunk.count(b"\n")
                        if lines >= max_lines:
                            cut = _nth_newline(chunk, chunk.count(b"\n") - (lines - max_lines))
                            handle.write(chunk[: cut + 1])
                            break
                    handle.write(chunk)
        finally:
            response.release_conn()
        part.replace(path)
        return path

    def _open(self, url: str) -> tuple[str, urllib3.BaseHTTPResponse]:
        """Follow redirects (each hop re-checked by the guard) to a 200 response, body not yet read."""
        try:
            return self._follow(url)
        except FetchError as err:
            if err.source == url:
                raise
            # Name the URL the caller asked for; say where along the redirects it failed.
            raise FetchError(url, f"{err.message} (at {err.source})", err.reason) from None

    def _follow(self, url: str) -> tuple[str, urllib3.BaseHTTPResponse]:
        seen = []
        for _ in range(self.config.max_redirects + 1):
            seen.append(url)
            response = self._get_once(url)
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                response.drain_conn()
                response.release_conn()
                url = urljoin(url, response.headers["Location"])
                if url in seen:
                    raise FetchError(seen[0], f"redirect loop via {url}", "redirect_loop")
                continue
            if response.status != 200:
                response.release_conn()
                raise FetchError(url, f"HTTP {response.status}", f"http_{response.status}")
            robots = response.headers.get("X-Robots-Tag", "").lower()
            if self.config.respect_robots_header and ("noai" in robots or "noimageai" in robots):
                response.release_conn()
                raise FetchError(url, f"X-Robots-Tag forbids AI use ({robots})", "robots_noai")
            return url, response
        raise FetchError(seen[0], f"more than {self.config.max_redirects} redirects", "too_many_redirects")

    def _get_once(self, url: str) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(url, f"unsupported scheme {parts.scheme!r} (only http and https)", "bad_scheme")
        if not parts.hostname:
            raise FetchError(url, "URL has no host", "bad_url")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError(url, "URL has an invalid port", "bad_url") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        timeout = urllib3.Timeout(connect=self.config.connect_timeout, read=self.config.read_timeout)
        reason, message = "error", ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff * 2 ** (attempt - 1))
            try:
                address = self._resolve(url, parts.hostname, port)
                pool = self._pool(parts.scheme, address, port, parts.hostname)
                response = pool.urlopen(
                    "GET", path, headers={"Host": host_header, "User-Agent": self.config.user_agent},
                    redirect=False, retries=False, preload_content=False, timeout=timeout,
                )
            except NewConnectionError as err:  # before ConnectTimeoutError: urllib3 subclasses it
                reason, message = "connection_error", f"connection failed: {_cause(err)}"
                continue
            except (ConnectTimeoutError, ReadTimeoutError, socket.timeout):
                reason, message = "timeout", "timed out"
                continue
            except SSLError as err:
                raise FetchError(url, f"TLS error: {err}", "tls_error") from None
            except (ProtocolError, HTTPError, OSError) as err:
                reason, message = "connection_error", f"connection failed: {type(err).__name__}"
                continue
            if response.status in RETRY_STATUSES:
                response.drain_conn()
                response.release_conn()
                reason, message = f"http_{response.status}", f"HTTP {response.status}"
                continue
            if response.status >= 400:
                response.drain_conn()
                response.release_conn()
                raise FetchError(url, f"HTTP {response.status}", f"http_{response.status}")
            return response
        raise FetchError(url, f"{message} after {self.config.retries + 1} attempts", reason)

    def _stream(self, url: str, response: urllib3.BaseHTTPResponse, limit: int) -> Iterator[bytes]:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError(url, f"body of {declared} bytes is over the {limit} byte limit", "too_large")
        total = 0
        try:
            for chunk in response.stream(64 * 1024):
                total += len(chunk)
                if total > limit:
                    raise FetchError(url, f"body is over the {limit} byte limit", "too_large")
                yield chunk
        except (ReadTimeoutError, socket.timeout):
            raise FetchError(url, "timed out reading the body", "timeout") from None
        except (ProtocolError, HTTPError) as err:
            raise FetchError(url, f"connection broke while reading: {type(err).__name__}", "connection_error") from None

    def _resolve(self, url: str, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise FetchError(url, f"cannot resolve host {host!r}: {err.strerror}", "dns_error") from None
        addresses = [info[4][0] for info in infos]
        if not self.config.allow_private_networks:
            for address in addresses:
                why = blocked_reason(address)
                if why and not any(ipaddress.ip_address(address) in net for net in self._allowed):
                    raise FetchError(
                        url, f"{host} resolves to {why} address {address}; pass --allow-private-networks to allow",
                        "blocked_address",
                    )
        return addresses[0]

    def _pool(self, scheme: str, address: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, address, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                # Connecting to the checked address (not the name) stops DNS rebinding past the guard;
                # TLS still verifies the certificate against the host name.
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(
                        address, port, maxsize=32, server_hostname=host, assert_hostname=host,
                        cert_reqs="CERT_REQUIRED",
                    )
                else:
                    pool = urllib3.HTTPConnectionPool(address, port, maxsize=32)
                self._pools[key] = pool
            return pool


def _cause(err: Exception) -> str:
    """The OS-level reason (e.g. "Connection refused") without urllib3's object dump."""
    text = str(err)
    return text.rsplit("] ", 1)[-1] if "] " in text else type(err).__name__


def _nth_newline(chunk: bytes, n: int) -> int:
    """Index of the n-th newline (1-based) in chunk."""
    index = -1
    for _ in range(n):
        index = chunk.index(b"\n", index + 1)
    return index
