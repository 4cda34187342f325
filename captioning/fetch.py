"""HTTP(S) fetching with timeouts, retries, size and redirect limits, and the private-address guard."""

from __future__ import annotations

import email.utils
import ipaddress
import socket
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from captioning.config import FetchConfig
from captioning.errors import FetchError, redact

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})  # a host asking us to slow down (Retry-After)
# Statuses --retry-failed fetches again: the network's, the host's "later", and the politeness ledger's own.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_408", "http_429", "http_500", "http_502",
                               "http_503", "http_504", "host_unavailable", "host_throttled", "robots_unavailable",
                               "systemic_failure"})


def getaddrinfo(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """The resolver (looked up per call, so that a test can inject a failing one)."""
    return socket.getaddrinfo(*args, **kwargs)


class HostGate(Protocol):
    """What a fetcher asks before and tells after each request to a host (captioning/hosts.py: the job's ledger)."""

    def permit(self, url: str, host: str) -> "contextlib.AbstractContextManager[None]":
        """Hold one of the host's concurrent-request slots for a whole fetch (its attempts and body)."""

    def before_attempt(self, url: str, host: str, deadline: float) -> None:
        """Wait for the host's turn (rate, Retry-After); raise FetchError if that is past deadline (monotonic)."""

    def after_attempt(self, host: str, status: int | None, kind: str, retry_after: float | None) -> None:
        """What an attempt got: an HTTP status, or the kind of failure (dns, refused, tls, timeout, reset)."""

    def allowed(self, url: str, fetcher: "Fetcher") -> None:
        """Raise FetchError unless the URL's robots.txt lets this tool fetch it (asked again of each redirect)."""


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


# Not caught by ipaddress.is_global on Python 3.11: the whole IETF protocol block (192.0.0.192 is a cloud
# metadata address) and NAT64 prefixes, whose embedded IPv4 address is checked instead.
EXTRA_BLOCKED = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24",))
NAT64 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries: mapped, 6to4, Teredo (server and client) and NAT64."""
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if any(ip in net for net in NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def blocked_reason(address: str) -> str | None:
    """Why an IP address may not be fetched by default, or None if it is globally reachable."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in embedded_ipv4(ip):
            why = blocked_reason(str(inner))
            if why:
                return f"{why} (embedded in {ip})"
        if any(ip in net for net in NAT64):
            return None  # a translator's address for the global IPv4 address just checked
    for name in ("is_loopback", "is_link_local", "is_multicast", "is_private", "is_reserved", "is_unspecified"):
        if getattr(ip, name):
            return name.removeprefix("is_").replace("_", "-")
    if not ip.is_global or any(ip in net for net in EXTRA_BLOCKED):
        return "non-global"
    return None


def check_host(url: str, host: str) -> None:
    """Refuse host names no resolver could take (empty or over-long labels, bad IDNA) before any lookup."""
    if host.startswith("[") or ":" in host:
        return  # an IPv6 literal; urlsplit has already parsed it
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        raise fetch_error(url, f"invalid host name {host!r}", "bad_url") from None
    if len(encoded) > 253:
        raise fetch_error(url, "host name is over 253 characters", "bad_url")


def fetch_error(url: str, message: str, reason: str, kind: str = "") -> FetchError:
    """A FetchError; kind says which side failed for the systemic-failure check: dns, refused, tls, timeout, reset,
    http (the host answered), or "" (this URL's own fault)."""
    err = FetchError(redact(url), message, reason)
    err.kind = kind  # type: ignore[attr-defined]
    return err


def failure_kind(err: BaseException) -> str:
    """The kind _error gave a fetch failure ("" for any other error)."""
    return getattr(err, "kind", "")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# X-Robots-Tag rules that carry a value after a colon (anything else before a colon names a user agent).
_VALUED_RULES = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")


def opted_out(headers: "urllib3.HTTPHeaderDict", tokens: tuple[str, ...], agent: str) -> str | None:
    """The opt-out a response's headers carry among tokens (X-Robots-Tag rules for every agent or ours, and
    TDMRep's tdm-reservation: 1), or None. Read from the headers alone, before any of the body."""
    if not tokens or "none" in tokens:
        return None
    wanted = {t.lower() for t in tokens}
    if "tdm-reservation" in wanted and headers.get("tdm-reservation", "").strip() == "1":
        return "tdm-reservation: 1"
    ours = agent.split("/", 1)[0].strip().lower()
    for value in headers.getlist("X-Robots-Tag") if hasattr(headers, "getlist") else [headers.get("X-Robots-Tag", "")]:
        value = value.strip().lower()
        head, colon, rest = value.partition(":")
        if colon and "," not in head and head.strip() not in _VALUED_RULES:
            if head.strip() != ours:
                continue  # rules for another crawler
            value = rest
        for rule in (r.strip() for r in value.split(",")):
            if rule in wanted:
                return f"X-Robots-Tag: {rule}"
    return None


class _Watch:
    """One request's clock: the total deadline and the transfer rate, checked by the watchdog thread."""

    def __init__(self, deadline: float, min_rate: float, grace: float) -> None:
        self.deadline, self.min_rate, self.grace = time.monotonic() + deadline, min_rate, grace
        self.connection: HTTPConnection | None = None
        self.attempt_started = time.monotonic()
        self.received = 0
        self.expired: str | None = None

    def attach(self, connection: HTTPConnection) -> None:
        """A new attempt starts reading on this connection: the rate is measured per attempt."""
        self.connection, self.attempt_started, self.received = connection, time.monotonic(), 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Neither the deadline nor the rate runs while this request waits its turn at a redirect's host."""
        connection, self.connection = self.connection, None
        start = time.monotonic()
        try:
            yield
        finally:
            self.deadline += time.monotonic() - start
            if self.connection is None:
                self.connection = connection

    def check(self, now: float) -> None:
        """Shut the socket down if the deadline passed or the transfer is too slow; the reader then fails."""
        if self.expired or self.connection is None:
            return
        elapsed = now - self.attempt_started
        if now > self.deadline:
            self.expired = "over the total deadline"
        elif elapsed > self.grace and self.received < self.min_rate * elapsed:
            self.expired = f"slower than {self.min_rate:.0f} bytes/s after {self.grace:.0f} s"
        else:
            return
        sock = getattr(self.connection, "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Watchdog:
    """One thread per process that enforces every live request's deadline, even in the middle of a read."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.watches: set[_Watch] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, watch: _Watch) -> None:
        with self.lock:
            self.watches.add(watch)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self.thread.start()

    def remove(self, watch: _Watch) -> None:
        with self.lock:
            self.watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self.lock:
                watches = list(self.watches)
            now = time.monotonic()
            for watch in watches:
                watch.check(now)


_WATCHDOG = _Watchdog()
_current = threading.local()  # the calling thread's _Watch, found by the connection classes below


class _Watched:
    """Connection mixin: hands the socket about to be read to the calling thread's watch."""

    def getresponse(self):  # noqa: ANN201
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.attach(self)
        return super().getresponse()


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _Slot:
    """The gate's slot for one fetch, held on whichever host the fetch is at: a redirect gives the last host's slot
    back before it waits for the next one's (never two at once, so that redirects between hosts cannot deadlock)."""

    def __init__(self, gate: HostGate | None) -> None:
        self.gate = gate
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def move(self, url: str) -> None:
        """Hold url's host's slot (none without a gate, or for a URL without a host: the fetch names it)."""
        self.stack.close()
        if self.gate is None:
            return
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            return
        if host:
            self.stack.enter_context(self.gate.permit(url, host))

    def hop(self, url: str, fetcher: "Fetcher", robots: bool) -> None:
        """A redirect to url: its robots.txt asked (a hop is a new URL to the host), then its host's slot."""
        if self.gate is None:
            return
        self.stack.close()
        watch: _Watch | None = getattr(_current, "watch", None)
        with watch.paused() if watch is not None else contextlib.nullcontext():
            if robots:
                self.gate.allowed(url, fetcher)
            self.move(url)


class Fetcher:
    """Thread-safe fetcher; each resolved address is checked, then that same address is connected to."""

    def __init__(self, config: FetchConfig | None = None, gate: HostGate | None = None) -> None:
        """gate: the job's per-host politeness (None: requests go out as soon as a thread is free)."""
        self.config = config or FetchConfig()
        self.gate = gate
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self._allowed = [ipaddress.ip_network(net, strict=False) for net in self.config.allowed_networks]
        self._lock = threading.Lock()

    def get(self, url: str, max_bytes: int | None = None, truncate: bool = False, opt_outs: bool = True) -> Fetched:
        """GET url and return its body; raises FetchError with a reason code.

        max_bytes: the body's cap (over it: too_large, or with truncate its first max_bytes); opt_outs: whether a
        response's opt-out headers stop it (not for robots.txt, which is itself the host's word)."""
        start = time.monotonic()
        with _Slot(self.gate) as slot:
            slot.move(url)
            with self._watching(url, self.config.deadline):
                final, response = self._open(url, opt_outs, slot)
                try:
                    data = b"".join(self._stream(url, response, max_bytes or self.config.max_bytes, truncate))
                finally:
                    response.release_conn()
        return Fetched(final, data, response.headers.get("Content-Type", ""), time.monotonic() - start)

    def download(self, url: str, path: Path, max_bytes: int, max_lines: int | None = None,
                 deadline: float | None = None) -> Path:
        """Stream url into path (atomically, when complete); max_lines stops early for text files.

        deadline: total seconds for this download (a data set file may take far longer than an image).
        """
        from captioning.storage import atomic_path  # noqa: PLC0415  (storage imports this module)

        lines = 0
        with self._watching(url, deadline or self.config.deadline), atomic_path(path) as part:
            _, response = self._open(url)
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
        return path

    @contextmanager
    def _watching(self, url: str, deadline: float) -> Iterator[_Watch]:
        """Enforce the total deadline and minimum rate of one request (with its retries and redirects)."""
        watch = _Watch(deadline, self.config.min_rate, self.config.min_rate_after)
        outer = getattr(_current, "watch", None)  # a redirect's robots.txt is fetched inside its image's fetch
        _current.watch = watch
        _WATCHDOG.add(watch)
        try:
            yield watch
        except FetchError as err:
            if watch.expired and err.reason != "timeout":
                # The watchdog cut the socket; whatever the read then reported, the cause is the clock.
                raise fetch_error(url, f"{watch.expired} ({deadline:g} s)", "timeout") from None
            raise
        finally:
            _WATCHDOG.remove(watch)
            _current.watch = outer

    def _open(self, url: str, opt_outs: bool = True,
              slot: "_Slot | None" = None) -> tuple[str, urllib3.BaseHTTPResponse]:
        """Follow redirects (each hop re-checked by the guard, and with a gate by its host's robots.txt and limits)
        to a 200 response, body not yet read."""
        try:
            return self._follow(url, opt_outs, slot)
        except FetchError as err:
            if err.source == redact(url):
                raise
            # Name the URL the caller asked for; say where along the redirects it failed.
            raise fetch_error(url, f"{err.message} (at {err.source})", err.reason, failure_kind(err)) from None

    def _follow(self, url: str, opt_outs: bool = True,
                slot: "_Slot | None" = None) -> tuple[str, urllib3.BaseHTTPResponse]:
        seen = []
        for _ in range(self.config.max_redirects + 1):
            if seen and slot is not None:
                slot.hop(url, self, robots=opt_outs)
            seen.append(url)
            response = self._get_once(url)
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                response.drain_conn()
                response.release_conn()
                try:
                    url = urljoin(url, response.headers["Location"])
                except ValueError:  # e.g. "Invalid IPv6 URL"
                    raise fetch_error(seen[0], f"malformed redirect target {redact(response.headers['Location'])!r}",
                                 "bad_url") from None
                if url in seen:
                    raise fetch_error(seen[0], f"redirect loop via {redact(url)}", "redirect_loop")
                continue
            if response.status != 200:
                response.release_conn()
                raise fetch_error(url, f"HTTP {response.status}", f"http_{response.status}")
            opt_out = opted_out(response.headers, self.config.opt_out_tokens, self.config.user_agent) \
                if self.config.respect_robots_header and opt_outs else None
            if opt_out:
                # Closed, not drained: the body is never read (the host sees the connection end after the headers).
                response.close()
                response.release_conn()
                reason = "tdm_reserved" if opt_out.startswith("tdm") else "robots_noai"
                raise fetch_error(url, f"the response opts out of AI use ({opt_out})", reason, "http")
            return url, response
        raise fetch_error(seen[0], f"more than {self.config.max_redirects} redirects", "too_many_redirects")

    def _get_once(self, url: str) -> urllib3.BaseHTTPResponse:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as err:  # "Invalid IPv6 URL", a port out of range or not a number
            raise fetch_error(url, f"malformed URL ({err})", "bad_url") from None
        if parts.scheme not in ("http", "https"):
            raise fetch_error(url, f"unsupported scheme {parts.scheme!r} (only http and https)", "bad_scheme")
        if not host:
            raise fetch_error(url, "URL has no host", "bad_url")
        check_host(url, host)
        port = port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        timeout = urllib3.Timeout(connect=self.config.connect_timeout, read=self.config.read_timeout)
        reason, message = "error", ""
        watch: _Watch | None = getattr(_current, "watch", None)
        gate, name = self.gate, parts.hostname.lower()
        waited = None  # a Retry-After the gate waits out instead of the backoff
        kind = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                pause = 0.0 if waited is not None else self.config.backoff * 2 ** (attempt - 1)
                if watch is not None and (watch.expired or time.monotonic() + pause > watch.deadline):
                    break  # the watchdog cut the last attempt, or no time is left for another
                time.sleep(pause)
            if gate is not None:
                gate.before_attempt(url, name, watch.deadline if watch is not None else time.monotonic() + 3600)
            try:
                address = self._resolve(url, parts.hostname, port)
                pool = self._pool(parts.scheme, address, port, parts.hostname)
                response = pool.urlopen(
                    "GET", path, headers={"Host": host_header, "User-Agent": self.config.user_agent},
                    redirect=False, retries=False, preload_content=False, timeout=timeout,
                )
            except FetchError as err:
                if gate is not None:
                    gate.after_attempt(name, None, failure_kind(err), None)
                raise
            except NewConnectionError as err:  # before ConnectTimeoutError: urllib3 subclasses it
                cause = _cause(err)
                reason, message = "connection_error", f"connection failed: {cause}"
                kind = "refused" if "refused" in cause.lower() else "reset"
                self._told(name, None, kind, None)
                continue
            except (ConnectTimeoutError, ReadTimeoutError, socket.timeout):
                reason, message, kind = "timeout", "timed out", "timeout"
                self._told(name, None, kind, None)
                continue
            except SSLError as err:
                self._told(name, None, "tls", None)
                raise fetch_error(url, f"TLS error: {err}", "tls_error", "tls") from None
            except (ProtocolError, HTTPError, OSError) as err:
                reason, message, kind = "connection_error", f"connection failed: {type(err).__name__}", "reset"
                self._told(name, None, kind, None)
                continue
            kind = "http"
            wait = retry_after(response.headers.get("Retry-After")) if response.status in THROTTLE_STATUSES else None
            self._told(name, response.status, kind, wait)
            if response.status in RETRY_STATUSES:
                response.drain_conn()
                response.release_conn()
                reason, message = f"http_{response.status}", f"HTTP {response.status}"
                waited = wait if gate is not None else None
                continue
            if response.status >= 400:
                response.drain_conn()
                response.release_conn()
                raise fetch_error(url, f"HTTP {response.status}", f"http_{response.status}", kind)
            return response
        if watch is not None and watch.expired:
            raise fetch_error(url, watch.expired, "timeout", "timeout")
        raise fetch_error(url, f"{message} after {attempt + 1} attempts", reason, kind)

    def _told(self, host: str, status: int | None, kind: str, wait: float | None) -> None:
        if self.gate is not None:
            self.gate.after_attempt(host, status, kind, wait)

    def _stream(self, url: str, response: urllib3.BaseHTTPResponse, limit: int,
                truncate: bool = False) -> Iterator[bytes]:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit and not truncate:
            raise fetch_error(url, f"body of {declared} bytes is over the {limit} byte limit", "too_large")
        total = 0
        watch: _Watch | None = getattr(_current, "watch", None)
        try:
            for chunk in response.stream(64 * 1024):
                total += len(chunk)
                if watch is not None:
                    watch.received += len(chunk)
                if total > limit:
                    if truncate:
                        yield chunk[: len(chunk) - (total - limit)]
                        response.close()
                        return
                    raise fetch_error(url, f"body is over the {limit} byte limit", "too_large")
                yield chunk
        except (ReadTimeoutError, socket.timeout):
            raise fetch_error(url, "timed out reading the body", "timeout") from None
        except (ProtocolError, HTTPError, OSError) as err:
            raise fetch_error(url, f"connection broke while reading: {type(err).__name__}", "connection_error") from None
        if watch is not None and watch.expired:  # a shut-down socket can also read as a clean end
            raise fetch_error(url, watch.expired, "timeout")

    def _resolve(self, url: str, host: str, port: int) -> str:
        try:
            infos = getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            # A name that does not exist is the URL's fault; a resolver that fails (EAI_AGAIN, EAI_FAIL) is ours.
            kind = "nxdomain" if err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)) else "dns"
            raise fetch_error(url, f"cannot resolve host {host!r}: {err.strerror}", "dns_error", kind) from None
        except (UnicodeError, ValueError) as err:  # IDNA failures, NUL bytes
            raise fetch_error(url, f"invalid host name {host!r}: {err}", "bad_url") from None
        except OSError as err:
            raise fetch_error(url, f"cannot resolve host {host!r}: {err}", "dns_error", "dns") from None
        addresses = [info[4][0] for info in infos]
        if not self.config.allow_private_networks:
            for address in addresses:
                why = blocked_reason(address)
                if why and not any(ipaddress.ip_address(address) in net for net in self._allowed):
                    raise fetch_error(
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
                    pool.ConnectionCls = _WatchedHTTPSConnection
                else:
                    pool = urllib3.HTTPConnectionPool(address, port, maxsize=32)
                    pool.ConnectionCls = _WatchedHTTPConnection
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
