"""The writer interface (one shape, interchangeable, as img2dataset's writers), and the commit every writer ends
with: data first, the shard's commit marker last, so a crash in between leaves a shard the next run redoes."""

from __future__ import annotations

import json
from typing import Any, Protocol

import pyarrow as pa

from captioning.shards.payloads import Committed
from captioning.storage import Storage


class Writer(Protocol):
    """Writes one processed shard of a job's output format, then commits it; reads back what it committed."""

    images: str  # the image bytes the fetch stage keeps on each ok row for it: "original", "model" or ""

    def write(self, processed: Any) -> Committed:
        """Write the shard's data, then its commit marker; returns its counts."""

    def previous(self, shard: int) -> tuple[int, pa.Table | None] | None:
        """For --retry-failed: the next attempt number of a committed shard and the rows it committed (None:
        the format keeps no rows across attempts, so the whole shard is redone); None if not committed."""


def commit_marker(storage: Storage, where: str, marker: dict[str, Any], attempt: int = 0) -> bool:
    """Commit a shard: its marker by conditional create (attempt 0), or by conditional replace of the previous
    attempt's marker (--retry-failed). False when another task committed this attempt first (a duplicate that
    Ray retried): that commit stands."""
    body = json.dumps(marker).encode()
    if attempt == 0:
        return storage.create(where, body) is not None
    current = storage.read_tagged(where)
    if current is None:
        return storage.create(where, body) is not None
    if json.loads(current[0]).get("attempt", 0) >= attempt:
        return False
    return storage.replace_if(where, body, current[1]) is not None
