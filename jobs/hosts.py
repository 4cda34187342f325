"""The host ledger on Ray: shards of captioning.hosts.ledger.HostLedger as async actors (hosts hashed to them),
and the link a fetch task reaches them through. No actor is in any request's path: a task asks for slots in
batches and hears of changes on one long-poll per shard."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any, Callable

from captioning.config import PolitenessConfig
from captioning.hosts.gate import Views, host_of, shard_of
from captioning.hosts.ledger import HostLedger

TASKS_PER_SHARD = 32  # fetch tasks per ledger shard (each call is microseconds of work; this keeps queues short)


class LedgerShard:
    """Ray actor (async): one shard of the job's host ledger."""

    def __init__(self, rules: PolitenessConfig) -> None:
        self.ledger = HostLedger(rules)
        self.tick = asyncio.Event()

    def _changed(self) -> None:
        self.tick.set()
        self.tick = asyncio.Event()

    async def exchange(self, task: str, asks: dict[str, int], gives: dict[str, int],
                       events: list[tuple[Any, ...]]) -> Any:
        result = self.ledger.exchange(task, asks, gives, events)
        self._changed()
        return result

    async def changes(self, task: str, since: int, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            got = self.ledger.changes(task, since)
            left = end - loop.time()
            if got is not None or left <= 0:
                return got
            try:
                await asyncio.wait_for(self.tick.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def robots_for(self, task: str, origin: str) -> tuple[str, str]:
        return self.ledger.robots_for(task, origin)

    async def leave(self, task: str) -> None:
        self.ledger.leave(task)
        self._changed()

    async def figures(self) -> dict[str, int]:
        return self.ledger.figures()


    async def job(self) -> Any:
        return self.ledger._job(self.ledger.clock())


class JobLedger:
    """The job's ledger shards for one run (none when it has no politeness rules), owned by the driver; while
    the run lasts, its systemic pauses are told on the driver's console (the tasks' own logs stay in theirs);
    at the end, its figures in one `hosts:` line, and the shards are gone."""

    def __init__(self, rules: PolitenessConfig, tasks: int, log: Callable[[str], None]) -> None:
        self.rules, self.tasks, self.log = rules, tasks, log
        self.handles: list[Any] = []
        self.stop = threading.Event()

    def __enter__(self) -> "JobLedger":
        import ray  # noqa: PLC0415

        if self.rules.active:
            shards = self.rules.ledger_shards or max(1, math.ceil(self.tasks / TASKS_PER_SHARD))
            actor = ray.remote(LedgerShard).options(num_cpus=0, max_restarts=-1, max_concurrency=1000)
            self.handles = [actor.remote(self.rules) for _ in range(shards)]
            threading.Thread(target=self._watch, name="hosts-job", daemon=True).start()
        return self

    def _watch(self) -> None:
        import ray  # noqa: PLC0415

        told = (0, "")
        while not self.stop.wait(2.0):
            try:
                job = ray.get(self.handles[0].job.remote(), timeout=10)
            except Exception:  # noqa: BLE001  (a restarting shard: ask again next time)
                continue
            if (job.pauses, job.gave_up) == told:
                continue
            if job.gave_up:
                self.log(f"warning: fetching gave up on {job.gave_up} errors after {job.pauses - 1} pause(s): those rows are "
                         "systemic_failure (transient: --retry-failed fetches them again)")
            elif job.pauses:
                self.log(f"warning: most requests fail with {job.cause} errors ({job.share:.0%} of a fetch task's "
                         f"last {self.rules.systemic_window}, over many hosts): this side's network or resolver, not "
                         f"the hosts; fetching pauses {self.rules.systemic_pause * 2 ** (job.pauses - 1):g} s, then "
                         f"retries (pause {job.pauses} of {self.rules.systemic_retries})")
            told = (job.pauses, job.gave_up)

    def __exit__(self, *exc: Any) -> None:
        import ray  # noqa: PLC0415

        self.stop.set()
        if not self.handles:
            return
        try:
            if exc[0] is None:
                total: dict[str, int] = {}
                for figures in ray.get([h.figures.remote() for h in self.handles], timeout=30):
                    for key, value in figures.items():
                        total[key] = total.get(key, 0) + value
                if any(total.values()):
                    self.log("hosts: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in total.items() if v))
        finally:
            for handle in self.handles:
                ray.kill(handle)


class RayLink:
    """A fetch task's link to the ledger shards: calls split by the shard owning each host, sent at once."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles
        self.since: dict[int, int] = {}
        self.pending: dict[int, Any] = {}

    def _shard(self, key: str) -> int:
        return shard_of(host_of(key), len(self.handles))

    def exchange(self, task: str, asks: dict[str, int], gives: dict[str, int],
                 events: list[tuple[Any, ...]]) -> Views:
        import ray  # noqa: PLC0415

        parts: dict[int, tuple[dict, dict, list]] = {}
        for host, value in asks.items():
            parts.setdefault(self._shard(host), ({}, {}, []))[0][host] = value
        for host, value in gives.items():
            parts.setdefault(self._shard(host), ({}, {}, []))[1][host] = value
        for event in events:
            # Job-wide events (systemic, healthy) belong to shard 0; the rest to their host's shard.
            shard = self._shard(event[1]) if event[0] not in ("systemic", "healthy") else 0
            parts.setdefault(shard, ({}, {}, []))[2].append(event)
        shards = list(parts)
        got = ray.get([self.handles[s].exchange.remote(task, *parts[s]) for s in shards])
        return [(views, job if shard == 0 else None) for shard, (views, job) in zip(shards, got)]

    def changes(self, task: str, timeout: float) -> Views:
        import ray  # noqa: PLC0415

        for shard, handle in enumerate(self.handles):
            if shard not in self.pending:
                self.pending[shard] = handle.changes.remote(task, self.since.get(shard, 0), timeout)
        refs = {ref: shard for shard, ref in self.pending.items()}
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout + 10)
        out: Views = []
        for ref in ready:
            shard = refs[ref]
            del self.pending[shard]
            got = ray.get(ref)
            if got is not None:
                self.since[shard] = got[0]
                out.append((got[1], got[2] if shard == 0 else None))
        return out

    def robots_for(self, task: str, origin: str) -> tuple[str, str]:
        import ray  # noqa: PLC0415

        return ray.get(self.handles[self._shard(origin)].robots_for.remote(task, origin))

    def leave(self, task: str) -> None:
        import ray  # noqa: PLC0415

        ray.get([h.leave.remote(task) for h in self.handles])
