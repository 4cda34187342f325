"""What the engine's stages count and time, for a metrics backend (jobs/metrics.py exports them through
ray.util.metrics, so a Ray cluster's Prometheus endpoint and the dashboard's Grafana show them); the library only
names them. The same figures per shard go into the commit markers."""

from __future__ import annotations

from typing import Iterable, Protocol

from captioning.shards.payloads import FetchedRow

# name -> (kind, description, tag keys); latencies in seconds
METRICS = {
    "captioning_rows": ("counter", "Rows committed, by status", ("job", "status")),
    "captioning_bytes_fetched": ("counter", "Bytes of images fetched", ("job",)),
    "captioning_host_events": ("counter", "Per-host politeness events: throttled answers (429/503), Retry-After "
                               "waits, rows stopped by robots.txt or an open breaker, systemic pauses",
                               ("job", "event")),
    "captioning_fetch_seconds": ("histogram", "Seconds to fetch one row (request, retries, politeness waits)",
                                 ("job",)),
    "captioning_decode_seconds": ("histogram", "Seconds to decode one image", ("job",)),
    "captioning_inference_seconds": ("histogram", "Seconds of the model stage per image of a shard", ("job",)),
    "captioning_actor_busy_seconds": ("counter", "Seconds the model-stage actors spent on shards", ("job",)),
}
BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class Metrics(Protocol):
    """A metrics backend: counters and histograms by name (from METRICS), with their tags."""

    def count(self, name: str, value: float, **tags: str) -> None:
        """Add value to a counter."""

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record one value of a histogram."""


class NoMetrics:
    """No backend: nothing recorded (run_here, tests)."""

    def count(self, name: str, value: float, **tags: str) -> None:
        """Nothing."""

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Nothing."""


NO_METRICS = NoMetrics()


def observe_rows(metrics: Metrics, rows: Iterable[FetchedRow], fetched_bytes: int, events: dict[str, int]) -> None:
    """A fetched shard's latencies, bytes and politeness events."""
    for row in rows:
        if row.fetch_seconds:
            metrics.observe("captioning_fetch_seconds", row.fetch_seconds)
        if row.decode_seconds:
            metrics.observe("captioning_decode_seconds", row.decode_seconds)
    if fetched_bytes:
        metrics.count("captioning_bytes_fetched", fetched_bytes)
    for event, value in events.items():
        if value:
            metrics.count("captioning_host_events", value, event=event)


def count_statuses(metrics: Metrics, statuses: Iterable[str]) -> None:
    """Rows committed, by status."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    for status, value in counts.items():
        metrics.count("captioning_rows", value, status=status)
