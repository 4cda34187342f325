import time

import pytest

from captioning.config import FetchConfig
from captioning.errors import FetchError
from captioning.fetch import Fetcher, blocked_reason, redact
from tests.conftest import Reply

LOCAL = FetchConfig(allow_private_networks=True, retries=2, backoff=0.01, read_timeout=0.5, max_bytes=1000)


def reason(fetcher: Fetcher, url: str) -> str:
    with pytest.raises(FetchError) as err:
        fetcher.get(url)
    assert url in str(err.value)  # every error names the URL
    return err.value.reason


def test_ok_and_user_agent(http_server):
    http_server.routes["/a"] = Reply(200, b"hello", {"Content-Type": "text/plain"})
    got = Fetcher(LOCAL).get(http_server.url("/a"))
    assert (got.data, got.content_type) == (b"hello", "text/plain")


def test_status_codes_and_retries(http_server):
    http_server.routes["/flaky"] = lambda hit: Reply(500) if hit == 1 else Reply(200, b"ok")
    http_server.routes["/down"] = Reply(503)
    fetcher = Fetcher(LOCAL)
    assert fetcher.get(http_server.url("/flaky")).data == b"ok"
    assert reason(fetcher, http_server.url("/missing")) == "http_404"
    assert http_server.hits["/missing"] == 1  # a 404 is final, never retried
    assert reason(fetcher, http_server.url("/down")) == "http_503"
    assert http_server.hits["/down"] == LOCAL.retries + 1


def test_timeout(http_server):
    http_server.routes["/slow"] = Reply(200, b"late", delay=1.5)
    assert reason(Fetcher(FetchConfig(**{**LOCAL.__dict__, "retries": 0})), http_server.url("/slow")) == "timeout"


def test_redirects(http_server):
    http_server.routes["/loop"] = Reply(302, headers={"Location": "/loop2"})
    http_server.routes["/loop2"] = Reply(302, headers={"Location": "/loop"})
    http_server.routes["/hop"] = Reply(301, headers={"Location": "/a"})
    http_server.routes["/a"] = Reply(200, b"there")
    for i in range(10):
        http_server.routes[f"/chain{i}"] = Reply(302, headers={"Location": f"/chain{i + 1}"})
    fetcher = Fetcher(LOCAL)
    got = fetcher.get(http_server.url("/hop"))
    assert got.data == b"there" and got.url.endswith("/a")
    assert reason(fetcher, http_server.url("/loop")) == "redirect_loop"
    assert reason(fetcher, http_server.url("/chain0")) == "too_many_redirects"


def test_size_limit_declared_and_streamed(http_server):
    http_server.routes["/big"] = Reply(200, b"x" * 5000)
    # No Content-Length: the body runs until the connection closes, so only the streamed count can stop it.
    http_server.routes["/stream"] = Reply(200, b"y" * 5000, {"Content-Length": ""})
    fetcher = Fetcher(LOCAL)
    assert reason(fetcher, http_server.url("/big")) == "too_large"
    assert reason(fetcher, http_server.url("/stream")) == "too_large"


def test_robots_header_is_respected_by_default(http_server):
    http_server.routes["/noai"] = Reply(200, b"img", {"X-Robots-Tag": "noai, noimageai"})
    assert reason(Fetcher(LOCAL), http_server.url("/noai")) == "robots_noai"
    relaxed = Fetcher(FetchConfig(**{**LOCAL.__dict__, "respect_robots_header": False}))
    assert relaxed.get(http_server.url("/noai")).data == b"img"


def test_private_addresses_are_blocked_unless_allowed(http_server):
    http_server.routes["/a"] = Reply(200, b"secret")
    strict = Fetcher(FetchConfig(retries=0))
    assert reason(strict, http_server.url("/a")) == "blocked_address"
    assert reason(strict, "http://localhost:9/") == "blocked_address"
    assert http_server.hits["/a"] == 0  # the request never left the guard


def test_every_redirect_hop_is_checked(http_server, monkeypatch):
    # Stand-in for "public host redirects to a private one", entirely on loopback: 127.0.0.1 plays the
    # public host and 127.0.0.2 the private target. No traffic leaves this machine.
    monkeypatch.setattr("captioning.fetch.blocked_reason", lambda a: "private" if a == "127.0.0.2" else None)
    target = f"http://127.0.0.2:{http_server.port}/inside"
    http_server.routes["/hop"] = Reply(302, headers={"Location": target})
    http_server.routes["/inside"] = Reply(200, b"secret")
    with pytest.raises(FetchError) as err:
        Fetcher(FetchConfig(retries=0)).get(http_server.url("/hop"))
    assert err.value.reason == "blocked_address"
    assert str(err.value).startswith(http_server.url("/hop")) and target in str(err.value)
    assert http_server.hits["/inside"] == 0


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.169.254", "link-local"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("172.16.5.5", "private"), ("224.0.0.1", "multicast"), ("0.0.0.0", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_blocked_reason(address, expected):
    why = blocked_reason(address)
    assert (why.split(" ")[0] if why else None) == expected


# Decision-function checks only: nothing ever connects to these addresses.
@pytest.mark.parametrize("address", [
    "100.64.0.1", "100.100.100.200",  # shared address space, one cloud's metadata service
    "192.0.0.192", "192.0.0.8", "192.0.0.170",  # IETF protocol assignments, another cloud's metadata service
    "198.18.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "203.0.113.9",
    "2002:a9fe:a9fe::1", "2002:0a00:0001::1", "2002:7f00:0001::1",  # 6to4 around link-local, private, loopback
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo (its embedded client is 192.0.2.45)
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1",  # NAT64 around metadata and loopback
    "::ffff:169.254.169.254", "::ffff:10.0.0.1", "fc00::1", "fd12:3456::1", "2001:db8::1", "::", "ff02::1",
])
def test_every_non_global_address_is_blocked(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2002:0808:0808::1",
                                     "64:ff9b::808:808"])
def test_global_addresses_pass(address):
    assert blocked_reason(address) is None


def test_schemes_and_bad_urls(monkeypatch):
    def no_lookups(*args, **kwargs):
        raise AssertionError(f"a malformed URL reached DNS: {args}")

    monkeypatch.setattr("socket.getaddrinfo", no_lookups)
    fetcher = Fetcher(FetchConfig(retries=0))
    assert reason(fetcher, "file:///etc/passwd") == "bad_scheme"
    assert reason(fetcher, "ftp://example.com/x.jpg") == "bad_scheme"
    assert reason(fetcher, "http:///nohost") == "bad_url"
    for url in ("http://[::1/x", "http://a..example/x.jpg", f"http://{'a' * 64}.example/x.jpg",
                "http://example.com:99999/x", "http://example.com:port/x", f"http://{'a.' * 140}com/"):
        with pytest.raises(FetchError) as err:
            fetcher.get(url)
        assert err.value.reason == "bad_url", (url, err.value)


def test_lookup_failures_of_any_kind_are_row_errors(monkeypatch):
    def broken(host, *args, **kwargs):
        raise {"nul": ValueError("embedded null byte"), "idna": UnicodeError("label too long"),
               "os": OSError(97, "Address family not supported")}[host]

    monkeypatch.setattr("socket.getaddrinfo", broken)
    fetcher = Fetcher(FetchConfig(retries=0))
    assert reason(fetcher, "http://nul/x") == "bad_url"
    assert reason(fetcher, "http://idna/x") == "bad_url"
    assert reason(fetcher, "http://os/x") == "dns_error"


def test_malformed_redirect_target_is_bad_url(http_server):
    http_server.routes["/r"] = Reply(302, headers={"Location": "http://[::1/x"})
    assert reason(Fetcher(LOCAL), http_server.url("/r")) == "bad_url"


def test_credentials_and_queries_never_reach_error_messages(http_server):
    http_server.routes["/r"] = Reply(302, headers={"Location": "/missing?token=hunter2"})
    url = f"http://user:s3cret@127.0.0.1:{http_server.port}/r?sig=abcdef"
    with pytest.raises(FetchError) as err:
        Fetcher(LOCAL).get(url)
    text = str(err.value)
    assert err.value.reason == "http_404" and "/missing" in text
    for secret in ("s3cret", "user:", "abcdef", "hunter2", "sig=", "token="):
        assert secret not in text, text
    assert redact("https://a:b@h.example/p?q=1#f") == "https://***@h.example/p?..."


def test_slow_drip_is_cut_at_the_total_deadline(http_server):
    # One byte every 0.1 s never trips the 1 s read timeout; only the total deadline stops it.
    http_server.routes["/drip-head"] = Reply(200, b"x" * 20, drip=0.1)  # ~45 bytes of headers first
    http_server.routes["/drip-body"] = lambda hit: Reply(200, b"y" * 100, drip=0.1)
    config = FetchConfig(**{**LOCAL.__dict__, "read_timeout": 1.0, "deadline": 1.5, "min_rate": 0.0})
    for route in ("/drip-head", "/drip-body"):
        start = time.monotonic()
        with pytest.raises(FetchError) as err:
            Fetcher(config).get(http_server.url(route))
        assert err.value.reason == "timeout" and "deadline" in err.value.message
        assert time.monotonic() - start < 3.0


def test_minimum_transfer_rate(http_server):
    http_server.routes["/trickle"] = Reply(200, b"z" * 200, drip=0.05)  # 20 bytes/s
    config = FetchConfig(**{**LOCAL.__dict__, "deadline": 30.0, "min_rate": 100.0, "min_rate_after": 1.0})
    start = time.monotonic()
    with pytest.raises(FetchError) as err:
        Fetcher(config).get(http_server.url("/trickle"))
    assert err.value.reason == "timeout" and "bytes/s" in err.value.message
    assert time.monotonic() - start < 4.0
    http_server.routes["/fine"] = Reply(200, b"ok" * 100)
    assert Fetcher(config).get(http_server.url("/fine")).data == b"ok" * 100  # a fast reply is untouched


def test_download_streams_to_file_and_can_stop_after_lines(http_server, tmp_path):
    http_server.routes["/t.tsv"] = Reply(200, b"".join(b"caption %d\thttp://x/%d\n" % (i, i) for i in range(100)))
    fetcher = Fetcher(LOCAL)
    path = fetcher.download(http_server.url("/t.tsv"), tmp_path / "t.tsv", max_bytes=10**6, max_lines=7)
    assert path.read_text().count("\n") == 7 and path.read_text().endswith("http://x/6\n")
    assert not (tmp_path / "t.tsv.part").exists()


def test_allowed_networks_let_through_only_those_addresses(http_server):
    http_server.routes["/a"] = Reply(200, b"fine")
    fetcher = Fetcher(FetchConfig(retries=0, allowed_networks=("127.0.0.1/32",)))
    assert fetcher.get(http_server.url("/a")).data == b"fine"
    assert reason(fetcher, f"http://127.0.0.2:{http_server.port}/a") == "blocked_address"
    assert http_server.hits["/a"] == 1
