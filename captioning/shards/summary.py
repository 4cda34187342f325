"""The end of a run: every shard committed once with exactly its manifest rows, then _SUCCESS.json."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Callable

from captioning.errors import CaptioningError
from captioning.shards.layout import COMMITTED, SUCCESS, uri
from captioning.shards.config import ShardedJob
from captioning.shards.plan import Layout
from captioning.storage import Storage


def check_ranges(config: ShardedJob, markers: list[dict], ranges: dict[int, tuple[int, int]]) -> None:
    """Every shard committed once, holding exactly its manifest rows: ranges, not only counts."""
    by_shard = {m["shard"]: m for m in markers}
    missing, wrong = [], []
    shards_total = len(ranges)
    for shard, (first, last) in ranges.items():
        marker = by_shard.get(shard)
        if marker is None:
            missing.append(shard)
        elif (marker.get("first_row"), marker.get("last_row"), marker["rows"]) != (first, last, last - first + 1):
            wrong.append(shard)
    wrong += sorted(shard for shard in by_shard if shard not in ranges)
    if wrong:
        raise CaptioningError(config.output, f"shard(s) {', '.join(map(str, wrong[:5]))} hold other rows than the "
                              "manifest now gives them; pass a new --output to start over")
    if missing:
        raise CaptioningError(config.output, f"{shards_total - len(missing)}/{shards_total} shards committed; rerun "
                              "the same command to finish")


def summarise(config: ShardedJob, storage: Storage, layout: Layout, started: float,
              extra: Callable[[list[dict], float], dict[str, Any]]) -> dict[str, Any]:
    """Check every shard is committed with exactly its rows, then write _SUCCESS.json: the fields every job
    reports, and the plug-in's `extra(markers, wall seconds)`."""
    markers = [json.loads(storage.read_bytes(m)) for m in storage.list(uri(config.output, COMMITTED))]
    check_ranges(config, markers, layout.ranges())
    statuses = Counter(status for m in markers for status in m["statuses"])
    seconds = time.time() - started
    summary = {"rows": sum(m["rows"] for m in markers), "shards": layout.shards,
               "statuses": dict(statuses.most_common()), "wall_seconds": seconds, "manifest": config.manifest,
               "generations": [{"first_row": g.first_row, "rows": g.rows, "first_shard": g.first_shard,
                                "manifest": g.manifest} for g in layout.generations],
               **extra(markers, seconds)}
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    storage.write_bytes(uri(config.output, SUCCESS), json.dumps(summary, indent=2).encode())
    return summary
