"""Per-host politeness for the whole job: slots and rates across tasks, Retry-After, robots.txt, opt-out headers,
the circuit breaker and systemic failures. Every host is a loopback server on its own 127.0.0.x address."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import urllib3
from PIL import Image

from captioning.bulk import BulkConfig, CaptionWriter
from captioning.config import FetchConfig, PolitenessConfig
from captioning.errors import FetchError
from captioning.fetch import TRANSIENT_REASONS, Fetcher, opted_out, retry_after
from captioning.hosts.gate import LocalLink, Politeness
from captioning.hosts.ledger import TASK_TIMEOUT, HostLedger
from captioning.manifest import ManifestSpec
from captioning.shards.fetching import fetch_shard
from captioning.shards.payloads import ShardInput
from captioning.shards.plan import plan_shards
from captioning.storage import Storage
from tests.hosts import Answer, Host

LOOPBACK = FetchConfig(allowed_networks=("127.0.0.0/8",), retries=0, read_timeout=20.0, deadline=40.0)
AGENT = LOOPBACK.user_agent


def jpeg(i: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (i * 7 % 256, 80, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


ROBOTS_FOR_ALL = "User-agent: *\nDisallow: /private/\n"
# A group for this tool's agent is the one it follows (RFC 9309): the catch-all's Disallow: / is not for it.
ROBOTS_FOR_US = "User-agent: *\nDisallow: /\n\nUser-agent: captioning\nDisallow: /no-captioning/\n"


@pytest.fixture
def hosts():
    """Three hosts (127.0.0.2-4) that hold each image request 50 ms, so that concurrent requests overlap."""
    image = jpeg()
    robots = {2: ROBOTS_FOR_ALL, 3: ROBOTS_FOR_ALL, 4: ROBOTS_FOR_US}
    made = [Host(f"127.0.0.{i}", lambda path, n: Answer(200, image, {"Content-Type": "image/jpeg"}, hold=0.05),
                 robots=robots[i]) for i in (2, 3, 4)]
    yield made
    for host in made:
        host.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the ledger, driven with injected events and a fake clock ---------------------------------------------------

def test_the_ledger_never_grants_more_slots_than_the_limit_and_passes_freed_ones_to_waiting_tasks_in_turn():
    clock = FakeClock()
    ledger = HostLedger(PolitenessConfig(per_host_concurrency=3), clock)
    granted = {task: ledger.exchange(task, {"h": 3}, {}, [])[0]["h"].granted for task in "abc"}
    assert granted == {"a": 3, "b": 0, "c": 0}
    views, _ = ledger.exchange("a", {}, {"h": 2}, [])  # a gives two back: b and c get one each, in turn
    assert sum(e for e in ledger.hosts["h"].held.values()) == 3
    assert ledger.hosts["h"].held == {"a": 1, "b": 1, "c": 1}
    _, b_views, _ = ledger.changes("b", 0)
    assert b_views["h"].granted == 1 and ledger.changes("b", ledger.version) is None  # each grant told once
    clock.now += TASK_TIMEOUT + 1  # a and c go silent (a killed task): their slots go to b, which still asks
    views, _ = ledger.exchange("b", {"h": 2}, {}, [])
    assert ledger.hosts["h"].held == {"b": 3} and views["h"].granted == 2


def test_retry_after_closes_a_host_for_every_task_and_repeated_429s_halve_its_limit():
    clock = FakeClock()
    ledger = HostLedger(PolitenessConfig(per_host_concurrency=8, slow_after=3), clock)
    ledger.exchange("a", {"h": 1}, {}, [])
    ledger.exchange("b", {"h": 1}, {}, [("throttled", "h", 3.0)])
    clock.now += 1
    _, views, _ = ledger.changes("a", 0)  # a holds a slot of h: it hears of the Retry-After
    assert views["h"].closed_for == pytest.approx(2.0)
    for _ in range(2):
        ledger.exchange("b", {}, {}, [("throttled", "h", None)])
    assert ledger.hosts["h"].limit == 4 and ledger.figures()["slowed"] == 1
    for _ in range(6):
        ledger.exchange("b", {}, {}, [("throttled", "h", None)])
    assert ledger.hosts["h"].limit == 1
    for _ in range(3):
        ledger.exchange("b", {}, {}, [("throttled", "h", None)])
    assert ledger.hosts["h"].limit == 1 and ledger.hosts["h"].rate == 2.0  # then the rate halves


def test_the_breaker_opens_after_failures_in_a_row_from_any_task_and_a_success_resets_the_count():
    ledger = HostLedger(PolitenessConfig(breaker_failures=3), FakeClock())
    ledger.exchange("a", {}, {}, [("failed", "h", "refused"), ("failed", "h", "refused")])
    ledger.exchange("b", {}, {}, [("ok", "h"), ("failed", "h", "timeout"), ("failed", "h", "timeout")])
    assert not ledger.hosts["h"].broken
    views, _ = ledger.exchange("b", {"h": 1}, {}, [("failed", "h", "timeout")])
    assert views["h"].broken == "3 failures in a row (timeout)"


def test_one_task_fetches_an_origins_robots_txt_the_others_wait_and_a_gone_fetcher_is_replaced():
    clock = FakeClock()
    ledger = HostLedger(PolitenessConfig(), clock)
    assert ledger.robots_for("a", "http://h:80") == ("fetch", "")
    assert ledger.robots_for("b", "http://h:80") == ("pending", "")
    ledger.exchange("a", {}, {}, [("robots", "http://h:80", "rules", "User-agent: *\nDisallow: /")])
    assert ledger.robots_for("b", "http://h:80") == ("rules", "User-agent: *\nDisallow: /")
    assert ledger.robots_for("a", "http://g:80") == ("fetch", "")
    ledger.leave("a")
    assert ledger.robots_for("b", "http://g:80") == ("fetch", "")


def test_a_systemic_failure_pauses_the_job_doubling_and_is_given_up_on_after_the_retries():
    clock = FakeClock()
    ledger = HostLedger(PolitenessConfig(systemic_pause=10, systemic_retries=2), clock)
    _, job = ledger.exchange("a", {}, {}, [("systemic", "dns", 0.9)])
    assert job.pause_for == 10 and job.reporter == "a" and job.cause == "dns"
    _, job = ledger.exchange("b", {}, {}, [("systemic", "dns", 0.9)])  # already paused: the same pause
    assert job.pauses == 1
    clock.now += 11
    _, job = ledger.exchange("b", {}, {}, [("systemic", "dns", 0.9)])
    assert job.pause_for == 20 and job.pauses == 2 and job.reporter == "a"
    clock.now += 21
    _, job = ledger.exchange("a", {}, {}, [("systemic", "dns", 0.9)])
    assert job.gave_up == "dns" and job.pause_for == 0
    _, job = ledger.exchange("a", {}, {}, [("healthy",)])
    assert not job.gave_up and job.pauses == 0


# -- the fetcher's gate over real loopback hosts, several tasks at once --------------------------------------------

def fetch_all(rules: PolitenessConfig, link: LocalLink, urls: list[str], threads: int = 8,
              fetch: FetchConfig = LOOPBACK) -> tuple[dict[str, str], dict[str, int]]:
    """One fetch task: its own gate, threads fetching urls; each URL's outcome and the gate's figures."""
    gate = Politeness(rules, link, fetch.user_agent)
    fetcher = Fetcher(fetch, gate)

    def one(url: str) -> str:
        try:
            gate.allowed(url, fetcher)
            fetcher.get(url)
            return "ok"
        except FetchError as err:
            return err.reason

    with ThreadPoolExecutor(threads) as pool:
        outcomes = dict(zip(urls, pool.map(one, urls)))
    return outcomes, gate.close()


def tasks_at_once(count: int, work) -> list:
    results: list = [None] * count
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, work(k))) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_no_host_ever_sees_more_than_the_per_host_concurrency_however_many_tasks_fetch_from_it(hosts):
    rules = PolitenessConfig(per_host_concurrency=2)
    link = LocalLink(rules)
    paths = ["/img/{k}-{j}.jpg", "/private/{k}-{j}.jpg", "/no-captioning/{k}-{j}.jpg"]
    urls = {k: [h.url(paths[j % 3].format(k=k, j=j)) for j in range(15) for h in hosts] for k in range(4)}
    results = tasks_at_once(4, lambda k: fetch_all(rules, link, urls[k]))
    forbidden = {hosts[0]: "/private/", hosts[1]: "/private/", hosts[2]: "/no-captioning/"}
    for host in hosts:
        assert host.most_active == 2  # reached, never passed
        assert host.hits["/robots.txt"] == 1  # once for the job, whichever task asked first
        assert not [p for _, p in host.requests if p.startswith(forbidden[host])]
    outcomes = {url: status for result, _ in results for url, status in result.items()}
    for host in hosts:
        mine = {u: s for u, s in outcomes.items() if u.startswith(host.url("/"))}
        assert {s for u, s in mine.items() if forbidden[host] in u} == {"robots_disallowed"}
        assert {s for u, s in mine.items() if forbidden[host] not in u} == {"ok"}
    assert sum(figures.get("robots_fetched", 0) for _, figures in results) == 3


def test_a_redirect_takes_its_targets_robots_txt_and_limit_across_every_host_that_sends_to_it(hosts):
    first, cdn, second = hosts  # every image of two hosts redirects to one cdn, which keeps /cdn/private/
    image = jpeg()
    for front in (first, second):
        front.answer = lambda path, n: Answer(302, headers={"Location": cdn.url(path.replace("/img/", "/cdn/"))},
                                              hold=0.02)
        front.robots = "User-agent: *\nAllow: /\n"
    cdn.answer = lambda path, n: Answer(200, image, {"Content-Type": "image/jpeg"}, hold=0.05)
    cdn.robots = "User-agent: *\nDisallow: /cdn/private/\n"
    rules = PolitenessConfig(per_host_concurrency=2)
    link = LocalLink(rules)
    urls = {k: [front.url(f"/img/{k}-{j}-{i}.jpg") for j in range(8) for i, front in enumerate((first, second))]
            + [first.url(f"/img/private/{k}.jpg")] for k in range(3)}
    results = tasks_at_once(3, lambda k: fetch_all(rules, link, urls[k]))
    outcomes = {url: status for result, _ in results for url, status in result.items()}
    assert {s for u, s in outcomes.items() if "/private/" not in u} == {"ok"}
    assert {s for u, s in outcomes.items() if "/private/" in u} == {"robots_disallowed"}
    # Two hosts' slots (2 each) in front of it, yet the cdn never saw more than its own limit.
    assert cdn.most_active == 2 and first.most_active <= 2 and second.most_active <= 2
    assert cdn.hits["/robots.txt"] == 1 and first.hits["/robots.txt"] == 1  # the target's, once for the job
    assert not [p for _, p in cdn.requests if "/private/" in p] and len(cdn.times("/cdn/")) == 48


def test_waiting_for_a_redirect_targets_slot_does_not_count_against_the_requests_deadline(hosts):
    front, cdn, _ = hosts
    image = jpeg()
    front.answer = lambda path, n: Answer(302, headers={"Location": cdn.url(path)})
    cdn.answer = lambda path, n: Answer(200, image, {"Content-Type": "image/jpeg"}, hold=0.3)
    rules = PolitenessConfig(per_host_concurrency=1, ignore_robots_txt=True)
    # Six requests in turn at the cdn take 1.8 s; each one's own transfer is well inside its 1 s deadline.
    result, _ = fetch_all(rules, LocalLink(rules), [front.url(f"/img/{j}.jpg") for j in range(6)], threads=6,
                          fetch=replace(LOOPBACK, deadline=1.0))
    assert set(result.values()) == {"ok"} and cdn.most_active == 1


def test_a_per_host_rate_spaces_every_tasks_requests(hosts):
    rules = PolitenessConfig(per_host_concurrency=4, per_host_rate=20.0, ignore_robots_txt=True)
    link = LocalLink(rules)
    host = hosts[0]
    tasks_at_once(3, lambda k: fetch_all(rules, link, [host.url(f"/img/{k}-{j}.jpg") for j in range(8)]))
    times = sorted(host.times("/img/"))
    assert len(times) == 24
    # 24 requests at 20/s over all tasks: the burst allowance is one request per slot holder, no more.
    assert times[-1] - times[0] >= (24 - 4) / 20.0


def test_retry_after_on_a_429_stops_every_task_from_requesting_that_host_for_its_seconds(hosts):
    host = hosts[0]
    image = jpeg()
    host.answer = lambda path, n: (Answer(429, b"slow down", {"Retry-After": "3"}) if path == "/img/0-0.jpg" and n == 1
                                   else Answer(200, image, {"Content-Type": "image/jpeg"}, hold=0.02))
    rules = PolitenessConfig(per_host_concurrency=4)
    link = LocalLink(rules)
    fetch = replace(LOOPBACK, retries=2)
    urls = {k: [host.url(f"/img/{k}-{j}.jpg") for j in range(20)] for k in range(3)}
    started = time.monotonic()
    results = tasks_at_once(3, lambda k: fetch_all(rules, link, urls[k], threads=4, fetch=fetch))
    assert {s for result, _ in results for s in result.values()} == {"ok"}  # the 429'd row retried after it
    with host.lock:
        throttled_at = next(t for t, p in host.requests if p == "/img/0-0.jpg")
        after = [t - throttled_at for t, p in host.requests if t > throttled_at]
    # What was in flight when the 429 left may still arrive; then nothing, from any task, for 3 s.
    in_flight = [t for t in after if t < 0.2]
    assert len(in_flight) <= 3 and min(t for t in after if t >= 0.2) >= 3.0 - 0.05
    assert time.monotonic() - started >= 3.0
    assert sum(figures.get("throttled", 0) for _, figures in results) == 1


def test_opt_out_headers_stop_the_body_from_being_read_and_none_lifts_them(hosts):
    host = hosts[0]
    body = jpeg() * 20
    headers = {"/noai.jpg": {"X-Robots-Tag": "noai"}, "/tdm.jpg": {"tdm-reservation": "1"},
               "/other-bot.jpg": {"X-Robots-Tag": "otherbot: noai"}, "/ours.jpg": {"X-Robots-Tag": "captioning: noimageai"}}
    host.answer = lambda path, n: Answer(200, body, headers.get(path, {}), wait_before_body=1.0)
    fetcher = Fetcher(LOOPBACK)
    reasons = {}
    for path in headers:
        try:
            fetcher.get(host.url(path))
            reasons[path] = "ok"
        except FetchError as err:
            reasons[path] = err.reason
    assert reasons == {"/noai.jpg": "robots_noai", "/tdm.jpg": "tdm_reserved", "/other-bot.jpg": "ok",
                       "/ours.jpg": "robots_noai"}
    host.settle()
    assert sorted(host.closed_before_body) == ["/noai.jpg", "/ours.jpg", "/tdm.jpg"]  # the body never sent
    assert len(Fetcher(replace(LOOPBACK, opt_out_tokens=("none",))).get(host.url("/tdm.jpg")).data) == len(body)
    assert len(Fetcher(replace(LOOPBACK, opt_out_tokens=("noai",))).get(host.url("/tdm.jpg")).data) == len(body)


def test_opt_out_and_retry_after_parsing():
    def headers(**values: str) -> urllib3.HTTPHeaderDict:
        made = urllib3.HTTPHeaderDict()
        for key, value in values.items():
            made.add(key.replace("_", "-"), value)
        return made

    tokens = ("noai", "noimageai", "tdm-reservation")
    assert opted_out(headers(X_Robots_Tag="noindex, NoImageAI"), tokens, AGENT) == "X-Robots-Tag: noimageai"
    assert opted_out(headers(X_Robots_Tag="unavailable_after: 25 Jun 2010 15:00:00 PST"), tokens, AGENT) is None
    assert opted_out(headers(tdm_reservation="0"), tokens, AGENT) is None
    assert opted_out(headers(X_Robots_Tag="noai"), ("noimageai",), AGENT) is None
    assert retry_after("120") == 120.0 and retry_after("soon") is None and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == pytest.approx(30.0)


def test_a_host_failing_again_and_again_gets_no_more_requests_and_its_rows_are_transient(hosts):
    host = hosts[0]
    host.answer = lambda path, n: Answer(500, b"broken")
    rules = PolitenessConfig(per_host_concurrency=1, breaker_failures=4)
    outcomes, figures = fetch_all(rules, LocalLink(rules), [host.url(f"/img/{j}.jpg") for j in range(30)], threads=4)
    statuses = list(outcomes.values())
    assert statuses.count("http_500") == 4 and statuses.count("host_unavailable") == 26
    assert len(host.times("/img/")) == 4 and "host_unavailable" in TRANSIENT_REASONS


def test_robots_txt_that_cannot_be_read_makes_its_rows_transient_and_a_404_allows_everything(hosts):
    down, missing = hosts[0], hosts[1]
    down.robots_status = 503  # asked once, never again within the job: its rows wait for a rerun
    missing.robots = None
    rules = PolitenessConfig(per_host_concurrency=2)
    outcomes, _ = fetch_all(rules, LocalLink(rules), [down.url(f"/img/{j}.jpg") for j in range(5)]
                            + [missing.url(f"/img/{j}.jpg") for j in range(5)])
    assert [outcomes[down.url(f"/img/{j}.jpg")] for j in range(5)] == ["robots_unavailable"] * 5
    assert [outcomes[missing.url(f"/img/{j}.jpg")] for j in range(5)] == ["ok"] * 5
    assert down.hits["/robots.txt"] == 1 and not down.times("/img/")


# -- systemic failures, through the fetch stage ----------------------------------------------------------------

def plan(tmp_path: Path, urls: list[str], **overrides) -> BulkConfig:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "url": u}) + "\n" for i, u in enumerate(urls)))
    config = BulkConfig(str(manifest), "unused", str(tmp_path / "out"), ManifestSpec(image_column="url", id_column="id"),
                        shard_size=len(urls), fetch=LOOPBACK, **overrides)
    plan_shards(config, Storage())
    return config


def test_a_resolver_that_fails_every_name_pauses_the_job_once_warns_once_and_leaves_transient_rows(
        tmp_path, monkeypatch, caplog):
    names = [f"host{i}.example" for i in range(12)]
    urls = [f"http://{names[i % 12]}/{i}.jpg" for i in range(60)]
    rules = PolitenessConfig(systemic_window=24, systemic_pause=0.6, systemic_retries=1, ignore_robots_txt=False)
    config = plan(tmp_path, urls, politeness=rules, fetch_threads=8)
    lookups = []

    def resolver_down(host, *args, **kwargs):
        lookups.append(time.monotonic())
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr("captioning.fetch.getaddrinfo", resolver_down)
    caplog.set_level(logging.WARNING, logger="captioning.hosts.gate")
    started = time.monotonic()
    fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config), LocalLink(rules))
    statuses = {row.status for row in fetched.rows}
    assert statuses == {"systemic_failure"} and "systemic_failure" in TRANSIENT_REASONS  # never dns_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dns errors" in warnings[0] and "pauses" in warnings[0]
    # It paused (0.6 s), tried again, and gave up: fewer lookups than rows x tries.
    gaps = [b - a for a, b in zip(lookups, lookups[1:])]
    assert max(gaps) >= 0.55 and time.monotonic() - started >= 0.6

    # The resolver is back: --retry-failed fetches exactly those rows again, politely, and they are fine now.
    monkeypatch.setattr("captioning.fetch.getaddrinfo", lambda host, *a, **k: socket.getaddrinfo("127.0.0.2", *a, **k))
    server = Host("127.0.0.2", lambda path, n: Answer(200, jpeg(int(path[1:].split(".")[0])),
                                                      {"Content-Type": "image/jpeg"}))
    try:
        urls_again = [u.replace(".example/", f".example:{server.port}/") for u in urls]
        (tmp_path / "again").mkdir()
        config = plan(tmp_path / "again", urls_again, politeness=rules, fetch_threads=8)
        fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config), LocalLink(rules))
        assert {row.status for row in fetched.rows} == {"ok"}
    finally:
        server.close()


def test_names_that_do_not_exist_are_the_rows_own_dns_errors_not_a_systemic_pause(tmp_path, monkeypatch, caplog):
    urls = [f"http://gone{i}.example/{i}.jpg" for i in range(40)]
    rules = PolitenessConfig(systemic_window=24, systemic_pause=30.0)
    config = plan(tmp_path, urls, politeness=rules)

    def nxdomain(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("captioning.fetch.getaddrinfo", nxdomain)
    caplog.set_level(logging.WARNING, logger="captioning.hosts.gate")
    started = time.monotonic()
    fetched = fetch_shard(ShardInput(0), config, CaptionWriter(config), LocalLink(rules))
    assert {row.status for row in fetched.rows} == {"dns_error"} and time.monotonic() - started < 20
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# -- on Ray: several fetch tasks at once, one ledger, metrics a cluster's Prometheus scrapes -------------------

def scrape(name: str, **labels: str) -> float:
    """The sum over every worker of a metric the local Ray exports (Prometheus text), with these labels."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib3.PoolManager().request("GET", f"http://127.0.0.1:{port}/metrics", timeout=10).data.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_on_ray_fetch_tasks_share_each_hosts_limit_robots_is_read_once_and_the_row_counters_add_up(
        ray_session, trained_bundle, tmp_path, hosts):
    from captioning.bulk import read_output
    from jobs.batch import run

    for host in hosts:
        host.answer = lambda path, n: Answer(200, jpeg(int(path.rsplit("/", 1)[1].split(".")[0])),
                                             {"Content-Type": "image/jpeg"}, hold=0.05)
    urls = [hosts[i % 3].url(f"/img/{i}.jpg") for i in range(60)] + [hosts[0].url("/private/60.jpg")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "url": u}) + "\n" for i, u in enumerate(urls)))
    config = BulkConfig(str(manifest), str(trained_bundle), str(tmp_path / "out"),
                        ManifestSpec(image_column="url", id_column="id"), shard_size=8, batch_size=8, fetch=LOOPBACK,
                        politeness=PolitenessConfig(per_host_concurrency=2), fetch_tasks=3, fetch_threads=8)
    time.sleep(2)  # earlier tests' workers report their last counts first
    before = {s: scrape("ray_captioning_rows_total", job="batch", status=s) for s in ("ok", "robots_disallowed")}
    lines: list[str] = []
    run(config, log=lines.append, progress=False)
    for host in hosts:
        assert host.most_active <= 2 and host.hits["/robots.txt"] == 1
    assert not hosts[0].times("/private/")
    statuses = {r["id"]: r["status"] for r in read_output(str(tmp_path / "out"))}
    assert statuses == {**{f"r{i}": "ok" for i in range(60)}, "r60": "robots_disallowed"}
    assert any(line.startswith("hosts: ") and "robots fetched 3" in line for line in lines), lines
    # Each shard's marker carries its figures: bytes fetched, robots.txt stops.
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_committed").glob("*.json")]
    assert sum(m["timing"]["counts"].get("robots_disallowed", 0) for m in markers) == 1
    assert sum(m["timing"]["counts"].get("bytes_fetched", 0) for m in markers) > 60 * 300
    from captioning.shards.status import job_status

    status = job_status(str(tmp_path / "out"), Storage())
    assert status["state"] == "finished" and status["rows_done"] == status["rows"] == 61
    assert status["statuses"] == {"ok": 60, "robots_disallowed": 1} and status["eta_seconds"] is None
    deadline = time.monotonic() + 30
    while True:
        delta = {s: scrape("ray_captioning_rows_total", job="batch", status=s) - before[s] for s in before}
        if delta == {"ok": 60, "robots_disallowed": 1} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert delta == {"ok": 60, "robots_disallowed": 1}
    assert scrape("ray_captioning_bytes_fetched_total", job="batch") > 0
    assert scrape("ray_captioning_fetch_seconds_count", job="batch") >= 60


def test_on_ray_the_driver_tells_the_jobs_systemic_pause_once_and_its_giving_up(ray_session):
    import ray

    from jobs.hosts import JobLedger

    lines: list[str] = []
    rules = PolitenessConfig(systemic_pause=1.0, systemic_retries=1)
    with JobLedger(rules, tasks=3, log=lines.append) as ledger:
        shard = ledger.handles[0]
        ray.get(shard.exchange.remote("task-a", {}, {}, [("systemic", "dns", 0.92)]))
        ray.get(shard.exchange.remote("task-b", {}, {}, [("systemic", "dns", 0.88)]))  # the same pause
        time.sleep(3.5)
        ray.get(shard.exchange.remote("task-a", {}, {}, [("systemic", "dns", 0.95)]))  # after it: gives up
        time.sleep(2.5)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2, lines
    assert "most requests fail with dns errors (92% of a fetch task's last 24" in warnings[0]
    assert "pauses 1 s" in warnings[0]
    assert "gave up on dns errors" in warnings[1] and "--retry-failed" in warnings[1]
    assert [line for line in lines if line.startswith("hosts:")] == ["hosts: systemic pauses 1"]
