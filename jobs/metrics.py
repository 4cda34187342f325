"""The engine's metrics (captioning/shards/metrics.py names them) through ray.util.metrics: each Ray worker
records its own and the node's metrics agent exports them to Prometheus (the Ray dashboard's Grafana panels)."""

from __future__ import annotations

from functools import cache
from typing import Any

from captioning.shards.metrics import BOUNDARIES, METRICS


@cache
def _metric(name: str, job: str) -> Any:
    from ray.util import metrics  # noqa: PLC0415

    kind, description, keys = METRICS[name]
    if kind == "counter":
        made = metrics.Counter(name, description=description, tag_keys=keys)
    else:
        made = metrics.Histogram(name, description=description, boundaries=BOUNDARIES, tag_keys=keys)
    made.set_default_tags({"job": job})
    return made


class RayMetrics:
    """Metrics of one job kind (batch, features) in this Ray worker."""

    def __init__(self, job: str) -> None:
        self.job = job

    def count(self, name: str, value: float, **tags: str) -> None:
        """Add value to a counter."""
        _metric(name, self.job).inc(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record one value of a histogram."""
        _metric(name, self.job).observe(value, tags=tags or None)
