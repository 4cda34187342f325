"""Planning: a manifest streamed into per-shard input files, once per output, and the changed-rerun check."""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from captioning.errors import CaptioningError
from captioning.fetch import TRANSIENT_REASONS
from captioning.manifest import iter_rows
from captioning.shards.config import ShardedJob
from captioning.shards.layout import COMMITTED, PLAN, input_uri, marker_uri, shard_name, uri
from captioning.shards.payloads import PlannedRow
from captioning.storage import Storage

PLAN_WRITERS = 16  # concurrent shard-input writes while planning
PLAN_VERSION = 1


def shard_count(rows: int, shard_size: int) -> int:
    """Shards a manifest of `rows` rows is planned into."""
    return -(-rows // shard_size)


def shard_rows(shard: int, rows: int, shard_size: int) -> tuple[int, int]:
    """The first and last manifest position of a shard."""
    first = shard * shard_size
    return first, min(first + shard_size, rows) - 1


def plan_record(config: ShardedJob, storage: Storage) -> dict[str, Any]:
    """What decides which rows land in which shard: the manifest's content, the shard size and the columns."""
    spec = config.spec
    return {"plan_version": PLAN_VERSION, "manifest": storage.describe(config.manifest),
            "shard_size": config.shard_size, "format": spec.format, "url_column": spec.image_column,
            "caption_column": spec.caption_column, "id_column": spec.id_column, **config.plan_extra()}


def check_plan(config: ShardedJob, storage: Storage) -> None:
    """Record the plan on a first run; refuse a rerun whose plan differs, before any work."""
    plan = plan_record(config, storage)
    where = uri(config.output, PLAN)
    if storage.create(where, json.dumps(plan, indent=2).encode()):
        if storage.list(uri(config.output, COMMITTED)):
            storage.delete(where)
            raise CaptioningError(config.output, "holds shards from a run without a plan record (an older "
                                  "version); use a new --output")
        return
    data = storage.read_tagged(where)
    old = json.loads(data[0]) if data else {}
    changed = [f"{key} {_plan_value(old.get(key))} -> {_plan_value(value)}"
               for key, value in plan.items() if old.get(key) != value]
    if changed:
        raise CaptioningError(config.output, "was planned with other settings (" + "; ".join(changed) + "): "
                              "rerun with the original manifest and options, or pass a new --output to start over")


def _plan_value(value: Any) -> str:
    if isinstance(value, dict):  # a manifest fingerprint: its size and a short hash say enough
        digest = str(value.get("sha256") or value.get("etag") or "").strip('"')[:12]
        return f"{value.get('bytes')} bytes {digest}"
    return repr(value)


def committed_shards(output: str, storage: Storage) -> set[str]:
    """Names of the shards with a commit marker."""
    return {name.rsplit("/", 1)[-1].removesuffix(".json")
            for name in storage.list(uri(output, COMMITTED)) if name.endswith(".json")}


def read_marker(output: str, shard: int, storage: Storage) -> dict[str, Any]:
    """A committed shard's marker."""
    return json.loads(storage.read_bytes(marker_uri(output, shard)))


def plan_shards(config: ShardedJob, storage: Storage) -> tuple[list[int], int]:
    """Stream the manifest into per-shard input files; returns the shards to process and the total row count.

    A committed shard is skipped, unless retry_failed is set and it holds transient failures.
    """
    committed: set[str] | None = None  # known once the plan is checked, after the first shard's rows
    todo, rows, batch, shard = [], 0, [], 0
    writes: deque[Future] = deque()

    def flush(shard: int, batch: list[PlannedRow]) -> None:
        nonlocal committed
        if committed is None:
            if all(r.error for r in batch):
                # A misread manifest (wrong --url-column or --format), caught before anything is written.
                raise CaptioningError(config.manifest, f"its first {len(batch)} rows are all malformed "
                                      f"({(batch[0].error or '').split(': ', 1)[-1]}); check --format and "
                                      "--url-column")
            check_plan(config, storage)
            committed = committed_shards(config.output, storage)
        if shard_name(shard) in committed:
            statuses = read_marker(config.output, shard, storage)["statuses"] if config.retry_failed else []
            if any(status in TRANSIENT_REASONS for status in statuses):
                todo.append(shard)
            return
        # Parallel PUTs: a Conceptual Captions manifest is ~13,000 shards; a bounded queue keeps memory flat.
        writes.append(pool.submit(storage.write_bytes, input_uri(config.output, shard),
                                  "".join(json.dumps(asdict(r)) + "\n" for r in batch).encode(), "application/jsonl"))
        while len(writes) > 2 * PLAN_WRITERS:
            writes.popleft().result()
        todo.append(shard)

    with ThreadPoolExecutor(PLAN_WRITERS) as pool:
        for row in iter_rows(config.manifest, config.spec, storage):
            # url is the cell as written (outputs trace back to it verbatim); source is where it resolves.
            batch.append(PlannedRow(row=row.row, index=rows, id=row.id, url=row.value, source=row.image,
                                    reference=row.captions[0] if row.captions else None,
                                    captions=list(row.captions), error=str(row.error) if row.error else None))
            rows += 1
            if len(batch) == config.shard_size:
                flush(shard, batch)
                batch, shard = [], shard + 1
        if batch:
            flush(shard, batch)
        for write in writes:
            write.result()
    return todo, rows


def read_planned(output: str, shard: int, storage: Storage) -> list[PlannedRow]:
    """A shard's planned input rows."""
    lines = storage.read_bytes(input_uri(output, shard)).decode().splitlines()
    return [PlannedRow(**json.loads(line)) for line in lines]
