"""The live progress of a sharded job, running or finished, read from its output alone: the plan says how many
rows there are, the commit markers what is done (rows, statuses, when, and each shard's fetch figures), the lease
whether a run is writing now. `captioning status OUTPUT` prints it."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from captioning.errors import CaptioningError
from captioning.fetch import TRANSIENT_REASONS
from captioning.lease import lease_uri, live_holder
from captioning.shards.layout import COMMITTED, SUCCESS, uri
from captioning.shards.plan import read_layout
from captioning.storage import Storage

RATE_WINDOW = 300.0  # seconds of recent commits the rate of a running job is measured over


def job_status(output: str, storage: Storage, now: float | None = None) -> dict[str, Any]:
    """Rows done of the plan's, statuses, rate and ETA, the shards' summed figures, and who is running it."""
    now = time.time() if now is None else now
    layout = read_layout(output, storage)
    if not layout.generations:
        raise CaptioningError(output, "not a sharded job's output (no _plan.json): nothing has been planned here")
    names = [n for n in storage.list(uri(output, COMMITTED)) if n.endswith(".json")]
    with ThreadPoolExecutor(16) as pool:  # thousands of small objects on S3: read them side by side
        markers = list(pool.map(lambda n: json.loads(storage.read_bytes(n)), names))
    statuses: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for marker in markers:
        statuses.update(marker.get("statuses", []))
        counts.update(marker.get("timing", {}).get("counts", {}))
    done = sum(m.get("rows", 0) for m in markers)
    holder = live_holder(storage, lease_uri(output))
    finished = storage.exists(uri(output, SUCCESS)) and done >= layout.rows
    rate = _rate(markers, now, running=holder is not None)
    left = max(layout.rows - done, 0)
    return {
        "output": output, "state": "finished" if finished else "running" if holder else "stopped",
        "holder": {k: holder.get(k) for k in ("what", "host", "pid", "age") if k in holder} if holder else None,
        "rows": layout.rows, "rows_done": done, "shards": layout.shards, "shards_done": len(markers),
        "rows_per_second": round(rate, 2) if rate else None,
        "eta_seconds": round(left / rate) if rate and holder and left else None,
        "statuses": dict(statuses.most_common()),
        "transient": sum(n for s, n in statuses.items() if s in TRANSIENT_REASONS),
        "counts": dict(sorted(counts.items())),
    }


def _rate(markers: list[dict], now: float, running: bool) -> float | None:
    """Rows per second: over the last RATE_WINDOW seconds of commits while running, else over the whole run."""
    commits = sorted((m["committed"], m.get("rows", 0), _started(m)) for m in markers if m.get("committed"))
    if not commits:
        return None
    if running:
        recent = [c for c in commits if c[0] >= now - RATE_WINDOW]
        if not recent:
            return 0.0
        start = max(now - RATE_WINDOW, min(c[2] for c in recent))
        return sum(c[1] for c in recent) / max(now - start, 1e-9)
    start = min(c[2] for c in commits)
    return sum(c[1] for c in commits) / max(commits[-1][0] - start, 1e-9)


def _started(marker: dict) -> float:
    """When a shard's first stage began (its fetch), else its commit time."""
    spans = marker.get("timing", {}).get("spans", {})
    return min((s for s, _ in spans.values()), default=marker["committed"])


def describe(status: dict[str, Any]) -> list[str]:
    """The status as lines for people."""
    rows, done = status["rows"], status["rows_done"]
    holder = status["holder"]
    state = status["state"]
    if holder:
        state += f" ({holder.get('what', 'a run')} on {holder.get('host', '?')}, pid {holder.get('pid', '?')})"
    elif state == "stopped":
        state += " (no run holds its lease: rerun the same command to go on)"
    lines = [f"{status['output']}: {state}",
             f"rows: {done:,} of {rows:,} ({100 * done / max(rows, 1):.1f}%) in {status['shards_done']:,} of "
             f"{status['shards']:,} shards"]
    rate = status["rows_per_second"]
    if rate is not None:
        eta = status["eta_seconds"]
        lines.append(f"rate: {rate:,.1f} rows/s" + (f"; done in about {_duration(eta)}" if eta else ""))
    if status["statuses"]:
        shown = ", ".join(f"{s} {n:,} ({100 * n / max(done, 1):.0f}%)" for s, n in status["statuses"].items())
        lines.append(f"statuses: {shown}")
    if status["transient"]:
        lines.append(f"transient: {status['transient']:,} rows (rerun with --retry-failed to fetch them again)")
    counts = dict(status["counts"])
    if counts:
        fetched = counts.pop("bytes_fetched", 0)
        parts = [f"{_size(fetched)} fetched"] + [f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items()]
        lines.append("fetching: " + ", ".join(parts))
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"
