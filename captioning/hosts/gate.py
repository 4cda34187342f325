"""The fetch side of the job's politeness: one Politeness per fetch task holds the task's share of each host's
budget (slots, rate) from the host ledger, waits out Retry-After and systemic pauses, reads each origin's
robots.txt once per job (whichever task the ledger picks), and tells the ledger what the hosts answered."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from typing import Any, Callable, Iterator, Protocol, TypeVar
from urllib.parse import urlsplit

from captioning.config import PolitenessConfig
from captioning.errors import CaptioningError, FetchError
from captioning.fetch import Fetcher, failure_kind, fetch_error
from captioning.hosts.ledger import FAILURE_KINDS, HostLedger, HostView, JobView

log = logging.getLogger(__name__)

SYSTEMIC_KINDS = frozenset({"dns", "refused", "tls"})  # failures that say "our side" when every host has them
ROBOTS_MAX_BYTES = 512 * 1024  # Google reads the first 500 KiB of a robots.txt and so do we
IDLE_GRACE = 0.25  # seconds a task keeps an idle host's slots (its next row of that host may be close)
WATCH_SECONDS = 1.0  # one long-poll per ledger shard at most this long: also the task's heartbeat

Views = list[tuple[dict[str, HostView], JobView | None]]
T = TypeVar("T")


class Link(Protocol):
    """How a task reaches the ledger shards (in this process, or Ray actors: jobs/hosts.py)."""

    def exchange(self, task: str, asks: dict[str, int], gives: dict[str, int],
                 events: list[tuple[Any, ...]]) -> Views:
        """Slots asked and given back, events reported; the task's views of the hosts concerned."""

    def changes(self, task: str, timeout: float) -> Views:
        """The task's views that changed, waiting up to timeout for one."""

    def robots_for(self, task: str, origin: str) -> tuple[str, str]:
        """The origin's robots.txt verdict and text, or ("fetch", "") / ("pending", "")."""

    def leave(self, task: str) -> None:
        """The task is done."""


def shard_of(key: str, shards: int) -> int:
    """The ledger shard that owns a host or origin (stable across processes)."""
    return zlib.crc32(key.encode()) % shards


def host_of(key: str) -> str:
    """The host of an origin key (scheme://host:port), or the key itself."""
    return key.split("://", 1)[-1].rsplit(":", 1)[0] if "://" in key else key


class LocalLink:
    """The ledger in this process (run_here, tests): one shard behind a condition variable."""

    def __init__(self, rules: PolitenessConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = HostLedger(rules, clock)
        self.cond = threading.Condition()
        self.since: dict[str, int] = {}

    def exchange(self, task: str, asks: dict[str, int], gives: dict[str, int],
                 events: list[tuple[Any, ...]]) -> Views:
        with self.cond:
            result = self.ledger.exchange(task, asks, gives, events)
            self.cond.notify_all()
        return [result]

    def changes(self, task: str, timeout: float) -> Views:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                got = self.ledger.changes(task, self.since.get(task, 0))
                if got is not None:
                    self.since[task] = got[0]
                    return [(got[1], got[2])]
                left = end - time.monotonic()
                if left <= 0:
                    return []
                self.cond.wait(left)

    def robots_for(self, task: str, origin: str) -> tuple[str, str]:
        with self.cond:
            return self.ledger.robots_for(task, origin)

    def leave(self, task: str) -> None:
        with self.cond:
            self.ledger.leave(task)
            self.since.pop(task, None)
            self.cond.notify_all()


class Politeness:
    """One fetch task's side of the host ledger; the Fetcher's gate (captioning.fetch.HostGate)."""

    def __init__(self, rules: PolitenessConfig, link: Link, user_agent: str) -> None:
        self.rules, self.link = rules, link
        self.agent = user_agent.split("/", 1)[0].strip()
        self.task = uuid.uuid4().hex
        self.limited = bool(rules.per_host_concurrency or rules.per_host_rate)
        self.cond = threading.Condition()
        self.slots: Counter[str] = Counter()  # granted by the ledger and not given back
        self.in_use: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        self.asked: Counter[str] = Counter()  # slots asked for and not yet granted
        self.idle_since: dict[str, float] = {}
        self.views: dict[str, HostView] = {}
        self.closed_until: dict[str, float] = {}
        self.next_at: dict[str, float] = {}
        self.reported: set[str] = set()  # hosts this task told of failures (a success then resets them)
        self.streak: Counter[str] = Counter()  # this task's failures in a row per host
        self.broken: dict[str, str] = {}  # hosts this task's own streak gave up on
        self.asks: dict[str, int] = {}
        self.gives: Counter[str] = Counter()
        self.events: list[tuple[Any, ...]] = []
        self.job = JobView()
        self.job_pause_until = 0.0
        self.suspect = False  # this task saw, or the job paused for, a systemic failure
        self.gave_up = ""
        self.warned = self.sent_systemic = False
        self.pauses_seen = 0  # the job's pauses this task has heard of
        self.window: deque[tuple[str, str]] = deque(maxlen=rules.systemic_window)
        self.robots: dict[str, Any] = {}  # origin -> Protego rules, or a verdict string
        self.robots_locks: dict[str, threading.Lock] = {}
        self.figures: Counter[str] = Counter()
        self.stopped = False
        self.threads = [threading.Thread(target=self._send_loop, name="hosts-send", daemon=True),
                        threading.Thread(target=self._watch_loop, name="hosts-watch", daemon=True)]
        for thread in self.threads:
            thread.start()

    # -- the Fetcher's gate ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def permit(self, url: str, host: str) -> Iterator[None]:
        """One of the host's slots for the whole fetch, waiting (and asking the ledger) for one."""
        with self.cond:
            self._check(url, host)
            if self.limited:
                self.waiting[host] += 1
                try:
                    while self.in_use[host] >= self._cap(host):
                        need = self.waiting[host] + self.in_use[host]  # this task's threads on the host
                        if need > self.slots[host] + self.asked[host]:
                            # Doubling what it holds, so that threads arriving one by one cost a few asks.
                            total = max(need, 2 * self.slots[host])
                            if self.rules.per_host_concurrency:
                                total = min(total, self.rules.per_host_concurrency)
                            self.asks[host] = self.asked[host] = max(total - self.slots[host], 1)
                            self.cond.notify_all()
                        if not self.cond.wait(0.5):
                            # Nothing for a while: ask again (a ledger shard that restarted lost the ask).
                            self.asks[host] = self.asked[host] = max(need - self.slots[host], 1)
                            self.cond.notify_all()
                        self._check(url, host)
                finally:
                    self.waiting[host] -= 1
            self.in_use[host] += 1
            self.idle_since.pop(host, None)
        try:
            yield
        finally:
            with self.cond:
                self.in_use[host] -= 1
                if self.limited:
                    self._settle(host)
                self.cond.notify_all()

    def before_attempt(self, url: str, host: str, deadline: float) -> None:
        """Wait for the host's turn: its Retry-After, the job's pause, its rate; refuse what would outlast the
        request's deadline."""
        waited = False
        with self.cond:
            while True:
                self._check(url, host)
                now = time.monotonic()
                closed = self.closed_until.get(host, 0.0)
                until = max(closed, self.job_pause_until, self.next_at.get(host, 0.0))
                if until <= now:
                    break
                if until > deadline:
                    if self.job_pause_until > deadline:
                        raise fetch_error(url, "fetching is paused (systemic failure)", "systemic_failure", "paused")
                    self.figures["throttled_rows"] += 1
                    raise fetch_error(url, f"{host} asked for {until - now:.0f} s more than this request has "
                                    "(Retry-After or its rate limit)", "host_throttled")
                if closed > now and not waited:
                    waited = True
                    self.figures["retry_after_waits"] += 1
                self.cond.wait(until - now)
            rate = self._rate(host)
            if rate:
                self.next_at[host] = max(now, self.next_at.get(host, 0.0)) + 1.0 / rate

    def after_attempt(self, host: str, status: int | None, kind: str, retry_after: float | None) -> None:
        """Record what an attempt got: the host's throttling and streaks, the task's systemic-failure window."""
        with self.cond:
            if status in (429, 503):
                self.figures["throttled"] += 1
                if retry_after is not None:
                    wait = min(retry_after, self.rules.max_retry_after + 1.0)
                    self.closed_until[host] = max(self.closed_until.get(host, 0.0), time.monotonic() + wait)
                self.events.append(("throttled", host, retry_after))
                self.window.append(("http", host))
            else:
                if status is not None:
                    kind = "http_5xx" if status >= 500 else "http"
                failed = kind in FAILURE_KINDS
                self.window.append((kind if failed else "ok", host))
                # A name that does not exist is that row's own failure, and while our side is failing, no host's.
                if failed and not self.suspect and kind != "nxdomain":
                    self.events.append(("failed", host, kind))
                    self.reported.add(host)
                    self.streak[host] += 1
                    if self.rules.breaker_failures and self.streak[host] >= self.rules.breaker_failures:
                        # Not one more request from this task while the ledger hears of it.
                        self.broken.setdefault(host, f"{self.streak[host]} failures in a row ({kind})")
                elif not failed:
                    self.streak.pop(host, None)
                if not failed and host in self.reported:
                    self.reported.discard(host)
                    self.events.append(("ok", host))
            self._judge()
            self.cond.notify_all()

    # -- robots.txt ------------------------------------------------------------------------------------------

    def allowed(self, url: str, fetcher: Fetcher) -> None:
        """Raise robots_disallowed (or robots_unavailable) unless the URL's origin's robots.txt lets this tool
        fetch it; the robots.txt is fetched once per job, by the task the ledger picks."""
        if self.rules.ignore_robots_txt:
            return
        try:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        except ValueError:
            return  # the fetch names the malformed URL
        if not parts.hostname:
            return
        rules = self.robots.get(origin)
        if rules is None:
            with self.cond:
                lock = self.robots_locks.setdefault(origin, threading.Lock())
            with lock:  # one thread of this task asks (and maybe fetches); the others wait for its answer
                rules = self.robots.get(origin)
                if rules is None:
                    rules = self.robots[origin] = self._robots(origin, url, fetcher)
        if rules == "unavailable":
            raise fetch_error(url, f"{origin}/robots.txt could not be read (tried once this job)", "robots_unavailable")
        if rules != "allow_all" and not rules.can_fetch(url, self.agent):
            self.figures["robots_disallowed"] += 1
            raise fetch_error(url, f"robots.txt of {parts.hostname} disallows it for {self.agent}", "robots_disallowed")

    def _robots(self, origin: str, url: str, fetcher: Fetcher) -> Any:
        end = time.monotonic() + 2 * fetcher.config.deadline + 5
        while True:
            try:
                verdict, text = self.link.robots_for(self.task, origin)
            except Exception as err:  # noqa: BLE001  (a restarting ledger shard: its rows wait for a rerun)
                if time.monotonic() > end:
                    raise fetch_error(url, f"the host ledger did not answer ({type(err).__name__})",
                                    "robots_unavailable") from None
                time.sleep(1.0)
                continue
            if verdict == "fetch":
                verdict, text = self._fetch_robots(origin, url, fetcher)
                self.link.exchange(self.task, {}, {}, [("robots", origin, verdict, text)])
            if verdict != "pending":
                break
            if time.monotonic() > end:
                return "unavailable"
            time.sleep(0.05)
        if verdict == "rules":
            from protego import Protego  # noqa: PLC0415

            return Protego.parse(text)
        return verdict

    def _fetch_robots(self, origin: str, url: str, fetcher: Fetcher) -> tuple[str, str]:
        """robots.txt through the same guard, deadline and gate as images: rules, allow_all (none to follow:
        4xx, or the site cannot be reached for reasons its rows will show) or unavailable (try again later)."""
        self.figures["robots_fetched"] += 1
        try:
            got = fetcher.get(f"{origin}/robots.txt", max_bytes=ROBOTS_MAX_BYTES, truncate=True, opt_outs=False)
        except FetchError as err:
            kind = failure_kind(err)
            if kind in SYSTEMIC_KINDS:
                self.link.exchange(self.task, {}, {}, [("robots_retry", origin)])
                raise fetch_error(url, f"robots.txt: {err.message}", err.reason, kind) from None
            if err.reason.startswith("http_"):
                code = int(err.reason[5:])
                return ("allow_all" if 400 <= code < 500 and code != 429 else "unavailable"), ""
            if kind in ("timeout", "reset", "tls") or err.reason in ("timeout", "connection_error"):
                return "unavailable", ""
            return "allow_all", ""
        return "rules", got.data.decode("utf-8", errors="replace")

    # -- systemic failures -----------------------------------------------------------------------------------

    def _judge(self) -> None:
        """Most of the last requests failing with one our-side cause over many hosts: pause the job."""
        if len(self.window) < self.window.maxlen:
            return
        kinds = Counter(kind for kind, _ in self.window if kind in SYSTEMIC_KINDS)
        kind, count = kinds.most_common(1)[0] if kinds else ("", 0)
        hosts = {host for k, host in self.window if k == kind}
        share = count / len(self.window)
        self.window.clear()
        if kind and share >= self.rules.systemic_share and len(hosts) >= max(3, self.rules.systemic_window // 4):
            self.suspect = True
            self.figures["systemic_reports"] += 1
            self.events.append(("systemic", kind, round(share, 3)))
        elif self.job.pauses or self.job.gave_up:
            self.events.append(("healthy",))

    def systemic(self, kind: str) -> str:
        """What a row that failed with this kind should do: "retry" (after the job's next pause), "give_up", or
        "" (its failure is its own)."""
        if kind not in SYSTEMIC_KINDS | {"paused"}:
            return ""
        self._flush_now()
        with self.cond:
            if self.gave_up:
                return "give_up"
            return "retry" if self.suspect else ""

    def wait_pause(self) -> None:
        """Block while the job is paused; with no pause yet, a moment for the one this task's report may start."""
        with self.cond:
            epoch, end = self.pauses_seen, time.monotonic() + 2.0
            while not self.stopped and not self.gave_up:
                now = time.monotonic()
                if self.job_pause_until > now:
                    self.cond.wait(self.job_pause_until - now)
                    epoch = -1  # waited one out: go again
                    continue
                if self.pauses_seen > epoch or now >= end:
                    return
                self.cond.wait(min(0.05, end - now))

    # -- the ledger ------------------------------------------------------------------------------------------

    def _check(self, url: str, host: str) -> None:
        view = self.views.get(host)
        broken = view.broken if view is not None and view.broken else self.broken.get(host)
        if broken:
            self.figures["breaker_rows"] += 1
            raise fetch_error(url, f"{host} is given up on for this job: {broken}", "host_unavailable")
        if self.gave_up:
            raise fetch_error(url, f"fetching gave up: most requests fail with {self.gave_up} errors (systemic)",
                            "systemic_failure", "paused")

    def _cap(self, host: str) -> int:
        view = self.views.get(host)
        target = view.target if view is not None else self.slots[host]
        return min(self.slots[host], max(target, 0))

    def _rate(self, host: str) -> float | None:
        view = self.views.get(host)
        return view.rate if view is not None else self.rules.per_host_rate

    def _settle(self, host: str) -> None:
        """Give back what the ledger asks back; note when a host's slots go idle (given back after a grace)."""
        surplus = self.slots[host] - max(self._cap(host), self.in_use[host])
        if surplus > 0 and self.views.get(host) is not None and self.views[host].target < self.slots[host]:
            self._give(host, surplus)
        if self.in_use[host] == 0 and self.waiting[host] == 0:
            if self.asked[host]:
                self.asks[host], self.asked[host] = 0, 0
            view = self.views.get(host)
            if view is not None and view.waiters and self.slots[host]:
                self._give(host, self.slots[host])  # other tasks wait for this host: no grace
            else:
                self.idle_since[host] = time.monotonic()

    def _give(self, host: str, slots: int) -> None:
        self.slots[host] -= slots
        self.gives[host] += slots
        if self.slots[host] <= 0:
            del self.slots[host]

    def _apply(self, results: Views) -> None:
        for views, job in results:
            for host, view in views.items():
                if view.granted:
                    self.slots[host] += view.granted
                    self.asked[host] = max(0, self.asked[host] - view.granted)
                old = self.views.get(host)
                if old is None or view.version >= old.version:
                    self.views[host] = view
                    if view.closed_for:
                        self.closed_until[host] = max(self.closed_until.get(host, 0.0),
                                                      time.monotonic() + view.closed_for)
                if not self.waiting[host] and not self.in_use[host] and self.slots[host]:
                    self.idle_since.setdefault(host, time.monotonic())
            if job is not None and job.version >= self.job.version:
                self.job = job
                if job.pause_for:
                    self.suspect = True
                    if job.pauses > self.pauses_seen:
                        self.pauses_seen = job.pauses
                    self.job_pause_until = max(self.job_pause_until, time.monotonic() + job.pause_for)
                    if job.pauses == 1 and job.reporter == self.task and not self.warned:
                        self.warned = True  # one warning per job: only the task whose report paused it
                        log.warning("most requests fail with %s errors (%.0f%% of this task's last %d, over many "
                                    "hosts): this side's network or resolver, not the hosts; fetching pauses "
                                    "%g s, then retries", job.cause, 100 * job.share, self.rules.systemic_window,
                                    job.pause_for)
                if job.gave_up and self.sent_systemic:
                    self.gave_up = job.gave_up
        self.cond.notify_all()

    def _take(self) -> tuple[dict[str, int], dict[str, int], list[tuple[Any, ...]]]:
        now = time.monotonic()
        for host, since in list(self.idle_since.items()):
            if now - since >= IDLE_GRACE and not self.in_use[host] and not self.waiting[host]:
                del self.idle_since[host]
                if self.slots[host]:
                    self._give(host, self.slots[host])
        asks, gives, events = self.asks, dict(self.gives), self.events
        self.asks, self.gives, self.events = {}, Counter(), []
        return asks, gives, events

    def _flush_now(self) -> None:
        """Send what is queued from this thread (a row that must know the job's answer before going on)."""
        with self.cond:
            asks, gives, events = self._take()
        if asks or gives or events:
            self._send(asks, gives, events)

    def _send(self, asks: dict[str, int], gives: dict[str, int], events: list[tuple[Any, ...]]) -> None:
        if any(event[0] == "systemic" for event in events):
            self.sent_systemic = True
        while True:
            try:
                results = self.link.exchange(self.task, asks, gives, events)
                break
            except Exception as err:  # noqa: BLE001  (a restarting ledger: keep the slots asked, try again)
                log.warning("host ledger unreachable (%s); trying again", type(err).__name__)
                if self.stopped:
                    return
                time.sleep(1.0)
        with self.cond:
            self._apply(results)

    def _send_loop(self) -> None:
        while not self.stopped:
            with self.cond:
                # Until something is queued, or the next idle host's grace is over.
                due = min(self.idle_since.values(), default=time.monotonic() + 0.5) + IDLE_GRACE
                self.cond.wait_for(lambda: self.asks or self.gives or self.events or self.stopped,
                                   timeout=max(0.0, due - time.monotonic()))
                asks, gives, events = self._take()
            if asks or gives or events:
                self._send(asks, gives, events)

    def _watch_loop(self) -> None:
        while not self.stopped:
            try:
                results = self.link.changes(self.task, WATCH_SECONDS)
            except Exception as err:  # noqa: BLE001
                log.warning("host ledger unreachable (%s); trying again", type(err).__name__)
                time.sleep(1.0)
                continue
            with self.cond:
                self._apply(results)

    def close(self) -> dict[str, int]:
        """Give every slot back and leave the ledger; the task's politeness figures."""
        self.stopped = True
        with self.cond:
            self.cond.notify_all()
        self.threads[0].join(timeout=5)  # the sender flushes what is queued; the watcher ends with its long-poll
        try:
            self._flush_now()  # the last reports; leaving frees the task's slots
            self.link.leave(self.task)
        except Exception as err:  # noqa: BLE001  (the ledger frees a silent task's slots after TASK_TIMEOUT)
            log.warning("host ledger unreachable on leaving (%s)", type(err).__name__)
        return dict(self.figures)


def in_turns(items: list[T], url_of: Callable[[T], str]) -> list[T]:
    """Items in turns over their URLs' hosts (the first of each host, then the second, ...): threads waiting for
    one busy host's slots are the fewest, and each host's requests spread over the work's time."""
    hosts: dict[str, list[T]] = {}
    for item in items:
        try:
            host = urlsplit(url_of(item).strip()).hostname or ""
        except ValueError:
            host = ""
        hosts.setdefault(host.lower(), []).append(item)
    return [item for turn in itertools.zip_longest(*hosts.values()) for item in turn if item is not None]


def through_pauses(gate: "Politeness | None", attempt: Callable[[], T]) -> T:
    """attempt() once, and again after each pause the job takes for a systemic failure it was caught in; a row
    still failing our side after the last pause raises with reason systemic_failure (transient), its kind kept."""
    rounds = 1 if gate is None else gate.rules.systemic_retries + 2
    for _ in range(rounds):
        try:
            return attempt()
        except CaptioningError as err:
            kind = failure_kind(err)
            verdict = gate.systemic(kind) if gate is not None else ""
            if verdict == "retry":  # our side failed, not the host: wait out the job's pause, then again
                gate.wait_pause()
                last = err
                continue
            if verdict == "give_up" or (verdict and kind == "paused"):
                err.reason = "systemic_failure"
            raise
    last.reason = "systemic_failure"  # still failing our side after every pause
    raise last
