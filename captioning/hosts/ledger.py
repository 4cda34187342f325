"""The host ledger: what a whole job owes each host, held in one place per host (no Ray here: jobs/hosts.py runs
shards of it as actors, run_here keeps one in its process).

Each host is owned by exactly one ledger shard (hosts are hashed to shards), so the ledger scales out with the job:
a fetch task asks a shard for slots of the hosts it is about to fetch from, in batches, and then sends its
requests without asking again; it hears of every change that concerns it (a grant, a Retry-After, a slower
limit, an open breaker) on one long-poll per shard. The ledger only counts: it never fetches.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from captioning.config import PolitenessConfig

TASK_TIMEOUT = 30.0  # seconds without a call after which a task is gone and its slots are freed
FAILURE_KINDS = frozenset({"dns", "nxdomain", "refused", "reset", "timeout", "tls", "http_5xx"})


@dataclass
class HostView:
    """What one task may do with one host now: deltas of slots granted, the rest as absolute values."""

    granted: int = 0  # slots newly granted to the task (a delta, delivered once)
    target: int = 0  # slots the task may keep (fewer than it holds: give some back)
    rate: float | None = None  # the task's share of the host's requests per second
    closed_for: float = 0.0  # seconds no request may start (Retry-After)
    broken: str = ""  # why the host gets no more requests in this job
    version: int = 0
    waiters: int = 0  # other tasks waiting for a slot of the host


@dataclass
class JobView:
    """The job-wide state: a systemic pause, or a cause given up on."""

    pause_for: float = 0.0
    gave_up: str = ""
    pauses: int = 0
    version: int = 0
    reporter: str = ""  # the task whose report started the first pause (it logs the one warning)
    cause: str = ""
    share: float = 0.0


@dataclass
class _Robots:
    state: str  # "claimed" or "done"
    owner: str = ""
    since: float = 0.0
    verdict: str = ""  # rules, allow_all, unavailable
    text: str = ""


@dataclass
class _Host:
    limit: int
    rate: float | None
    held: dict[str, int] = field(default_factory=dict)
    wants: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    closed_until: float = 0.0
    throttled: int = 0
    failures: int = 0
    broken: str = ""
    version: int = 0


class HostLedger:
    """One shard of the job's host ledger. Every method takes the caller's task id and returns that task's views;
    now is the ledger's own monotonic clock (views carry durations, never times, so clocks never mix)."""

    def __init__(self, rules: PolitenessConfig, clock: Any = time.monotonic) -> None:
        self.rules, self.clock = rules, clock
        self.hosts: dict[str, _Host] = {}
        self.robots: dict[str, _Robots] = {}
        self.seen: dict[str, float] = {}
        self.outbox: dict[str, dict[str, int]] = {}  # task -> host -> slots granted, not yet told
        self.version = 0
        self.job = JobView()
        self.job_pause_until = 0.0
        self.events: dict[str, int] = {"throttled": 0, "slowed": 0, "broken": 0, "robots_fetched": 0,
                                       "systemic_pauses": 0}

    # -- calls -----------------------------------------------------------------------------------------------

    def exchange(self, task: str, asks: dict[str, int], gives: dict[str, int],
                 events: list[tuple[Any, ...]]) -> tuple[dict[str, HostView], JobView]:
        """Apply a task's slots given back and its events, grant what its asks can get; its views of the hosts
        it asked for, holds or was granted."""
        now = self._touch(task)
        touched = set(asks) | set(gives)
        for host, slots in gives.items():
            self._give(task, host, slots)
        for event in events:
            touched |= self._event(task, event, now)
        for host, want in asks.items():
            entry = self._host(host)
            if want > 0:
                entry.wants[task] = want  # a new ask joins the queue's end; a repeated one keeps its place
            else:
                entry.wants.pop(task, None)
        for host in touched:
            self._grant(host)
        for host in asks:
            entry = self._host(host)
            if task in entry.wants and entry.held.keys() - {task}:
                self._bump(entry)  # left waiting: the holders hear of it (their fair share, the waiters)
        return self._views(task, touched | set(self.outbox.get(task, {})), now), self._job(now)

    def changes(self, task: str, since: int) -> tuple[int, dict[str, HostView], JobView] | None:
        """What changed for the task after version since (None: nothing yet)."""
        now = self._touch(task)
        mine = [h for h, e in self.hosts.items() if e.version > since and (task in e.held or task in e.wants)]
        mine += [h for h in self.outbox.get(task, {}) if h not in mine]
        if not mine and self.job.version <= since:
            return None
        return self.version, self._views(task, set(mine), now), self._job(now)

    def robots_for(self, task: str, origin: str) -> tuple[str, str]:
        """("fetch", "") for the task that must fetch an origin's robots.txt, ("pending", "") while another does,
        else (verdict, text)."""
        now = self._touch(task)
        entry = self.robots.get(origin)
        if entry is not None and entry.state == "claimed" and (entry.owner not in self.seen
                                                                or now - entry.since > 2 * TASK_TIMEOUT):
            entry = None  # its fetcher is gone: another task fetches
        if entry is None:
            self.robots[origin] = _Robots("claimed", task, now)
            return "fetch", ""
        if entry.state == "claimed":
            return ("fetch", "") if entry.owner == task else ("pending", "")
        return entry.verdict, entry.text

    def leave(self, task: str) -> None:
        """A task is done: its slots go to the tasks waiting."""
        self._drop(task)

    # -- inside ----------------------------------------------------------------------------------------------

    def _touch(self, task: str) -> float:
        now = self.clock()
        self.seen[task] = now
        for other, last in list(self.seen.items()):
            if now - last > TASK_TIMEOUT:
                self._drop(other)
        return now

    def _drop(self, task: str) -> None:
        self.seen.pop(task, None)
        self.outbox.pop(task, None)
        for host, entry in self.hosts.items():
            held, wanted = entry.held.pop(task, None), entry.wants.pop(task, None)
            if held is not None or wanted is not None:
                self._grant(host)
        for origin, robots in list(self.robots.items()):
            if robots.state == "claimed" and robots.owner == task:
                del self.robots[origin]

    def _host(self, host: str) -> _Host:
        entry = self.hosts.get(host)
        if entry is None:
            entry = self.hosts[host] = _Host(self.rules.per_host_concurrency, self.rules.per_host_rate)
        return entry

    def _bump(self, entry: _Host | None = None) -> None:
        self.version += 1
        if entry is not None:
            entry.version = self.version

    def _give(self, task: str, host: str, slots: int) -> None:
        entry = self._host(host)
        left = entry.held.get(task, 0) - slots
        if left > 0:
            entry.held[task] = left
        else:
            entry.held.pop(task, None)
        if entry.rate:
            self._bump(entry)  # the other holders' rate shares grow (a grant to a waiter bumps anyway)

    def _grant(self, host: str) -> None:
        """Hand free slots to waiting tasks, one at a time in turn, so that many tasks share a busy host."""
        entry, changed = self._host(host), False
        while entry.wants:
            free = entry.limit - sum(entry.held.values()) if entry.limit else 1
            if free <= 0:
                break
            task, want = next(iter(entry.wants.items()))
            entry.held[task] = entry.held.get(task, 0) + 1
            box = self.outbox.setdefault(task, {})
            box[host] = box.get(host, 0) + 1
            del entry.wants[task]
            if want > 1:
                entry.wants[task] = want - 1  # to the back of the queue: the next slot goes to the next task
            changed = True
        if changed and entry.rate:
            self._bump(entry)  # the holders' rate shares changed (the grantees hear of it from their outbox)

    def _event(self, task: str, event: tuple[Any, ...], now: float) -> set[str]:
        """A task's report: ("ok", host), ("failed", host, kind), ("throttled", host, retry_after),
        ("robots", origin, verdict, text), ("robots_retry", origin), ("systemic", kind, share), ("healthy",)."""
        what = event[0]
        if what == "ok":
            entry = self._host(event[1])
            entry.failures = entry.throttled = 0
            return set()
        if what == "failed":
            entry = self._host(event[1])
            entry.failures += 1
            if self.rules.breaker_failures and entry.failures >= self.rules.breaker_failures and not entry.broken:
                entry.broken = f"{entry.failures} failures in a row ({event[2]})"
                self.events["broken"] += 1
                self._bump(entry)
            return {event[1]}
        if what == "throttled":
            entry, wait = self._host(event[1]), event[2]
            entry.throttled += 1
            self.events["throttled"] += 1
            if wait is not None:
                entry.closed_until = max(entry.closed_until, now + wait)
            if entry.throttled >= self.rules.slow_after:
                entry.throttled = 0
                self._slow(entry)
            self._bump(entry)
            return {event[1]}
        if what == "robots":
            self.robots[event[1]] = _Robots("done", verdict=event[2], text=event[3])
            self.events["robots_fetched"] += 1
            return set()
        if what == "robots_retry":
            self.robots.pop(event[1], None)
            return set()
        if what == "systemic":
            self._systemic(task, event[1], event[2], now)
            return set()
        if what == "healthy":
            if self.job.pauses or self.job.gave_up:
                self.job.pauses, self.job.gave_up = 0, ""
                self._bump()
                self.job.version = self.version
            return set()
        raise ValueError(f"unknown host event {event!r}")

    def _slow(self, entry: _Host) -> None:
        """A host that keeps answering 429/503 gets half the concurrency (down to 1), then half the rate."""
        self.events["slowed"] += 1
        if entry.limit == 0:  # no limit was set: from what it holds now
            entry.limit = max(1, sum(entry.held.values()) // 2)
        elif entry.limit > 1:
            entry.limit //= 2
        else:
            entry.limit = 1
            entry.rate = (entry.rate or 4.0) / 2

    def _systemic(self, task: str, kind: str, share: float, now: float) -> None:
        if now < self.job_pause_until:
            return  # already paused: the other tasks saw the same
        if self.job.gave_up:
            return
        self.job.pauses += 1
        if self.job.pauses == 1:
            self.job.reporter, self.job.cause, self.job.share = task, kind, share
        if self.job.pauses > self.rules.systemic_retries:
            self.job.gave_up = kind
        else:
            self.events["systemic_pauses"] += 1
            self.job_pause_until = now + self.rules.systemic_pause * 2 ** (self.job.pauses - 1)
        self._bump()
        self.job.version = self.version

    def _views(self, task: str, hosts: set[str], now: float) -> dict[str, HostView]:
        box = self.outbox.pop(task, {})
        views = {}
        for host in hosts:
            entry = self._host(host)
            held = entry.held.get(task, 0)
            total = sum(entry.held.values())
            interested = len(set(entry.held) | set(entry.wants))
            # With others waiting, a task keeps no more than its fair share of the limit (at least one slot).
            target = held if not entry.wants or not entry.limit else max(1, entry.limit // max(1, interested))
            rate = entry.rate * held / total if entry.rate and total else entry.rate
            views[host] = HostView(box.get(host, 0), min(held, target), rate,
                                   max(0.0, entry.closed_until - now), entry.broken, entry.version,
                                   len([t for t in entry.wants if t != task]))
        return views

    def _job(self, now: float) -> JobView:
        return JobView(max(0.0, self.job_pause_until - now), self.job.gave_up, self.job.pauses, self.job.version,
                       self.job.reporter, self.job.cause, self.job.share)

    def figures(self) -> dict[str, int]:
        """Counts of what the ledger did: throttling events, slowed hosts, open breakers, robots fetched."""
        return dict(self.events)
