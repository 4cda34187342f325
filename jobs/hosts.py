"""The host ledger on Ray: shards of captioning.hosts.ledger.HostLedger as async actors (hosts hashed to them),
and the link a fetch task reaches them through. No actor is in any request's path: a task asks for slots in
batches and hears of changes on one long-poll per shard."""

from __future__ import annotations

import asyncio
import math
from typing import Any

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


def start_ledger(rules: PolitenessConfig, tasks: int) -> list[Any]:
    """The job's ledger shards (none when it has no politeness rules), owned by the driver: gone with the job."""
    import ray  # noqa: PLC0415

    if not rules.active:
        return []
    shards = rules.ledger_shards or max(1, math.ceil(tasks / TASKS_PER_SHARD))
    actor = ray.remote(LedgerShard).options(num_cpus=0, max_restarts=-1, max_concurrency=1000)
    return [actor.remote(rules) for _ in range(shards)]


def ledger_figures(handles: list[Any]) -> dict[str, int]:
    """The ledger's counts, over its shards."""
    import ray  # noqa: PLC0415

    total: dict[str, int] = {}
    for figures in ray.get([h.figures.remote() for h in handles]):
        for key, value in figures.items():
            total[key] = total.get(key, 0) + value
    return total


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
