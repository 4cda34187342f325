"""Planning: a manifest streamed into per-shard input files, once per output, and the changed-rerun check."""

from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from captioning.errors import CaptioningError
from captioning.fetch import TRANSIENT_REASONS
from captioning.manifest import iter_rows
from captioning.output_source import bulk_output_format, describe_source
from captioning.shards.config import ShardedJob
from captioning.shards.layout import COMMITTED, PLAN, input_uri, marker_uri, shard_name, uri
from captioning.shards.payloads import PlannedRow
from captioning.storage import Storage

PLAN_WRITERS = 16  # concurrent shard-input writes while planning
PLAN_VERSION = 2  # 2: generations, each with its rows' hash, so that a grown manifest continues


@dataclass(frozen=True)
class Generation:
    """The rows one manifest added to an output: the manifest as it was then, where its rows and shards start,
    and the sha256 of every planned row from the output's first to this generation's last (None until planned)."""

    manifest: dict[str, Any]
    first_row: int
    first_shard: int
    rows: int | None = None
    rows_sha256: str | None = None


@dataclass(frozen=True)
class Layout:
    """Which manifest rows each shard holds: every generation's rows in full shards but its last."""

    generations: tuple[Generation, ...]
    shard_size: int
    continued: bool = False  # this run appended the last generation (the manifest grew)

    @property
    def rows(self) -> int:
        """Rows over all generations."""
        last = self.generations[-1] if self.generations else None
        return last.first_row + (last.rows or 0) if last else 0

    @property
    def shards(self) -> int:
        """Shards over all generations."""
        last = self.generations[-1] if self.generations else None
        return last.first_shard + -(-(last.rows or 0) // self.shard_size) if last else 0

    def ranges(self) -> dict[int, tuple[int, int]]:
        """Each shard's first and last manifest position."""
        out = {}
        for gen in self.generations:
            for k in range(-(-(gen.rows or 0) // self.shard_size)):
                first = gen.first_row + k * self.shard_size
                out[gen.first_shard + k] = (first, min(first + self.shard_size, gen.first_row + (gen.rows or 0)) - 1)
        return out


def plan_record(config: ShardedJob) -> dict[str, Any]:
    """What decides which rows land in which shard, besides the manifest: the shard size and the columns."""
    spec = config.spec
    return {"plan_version": PLAN_VERSION, "shard_size": config.shard_size, "format": spec.format,
            "url_column": spec.image_column, "caption_column": spec.caption_column, "id_column": spec.id_column,
            **config.plan_extra()}


def _refusal(config: ShardedJob, changed: list[str]) -> CaptioningError:
    return CaptioningError(config.output, "was planned with other settings (" + "; ".join(changed) + "): rerun "
                           "with the original manifest and options, or pass a new --output to start over")


def _plan_value(value: Any) -> str:
    if isinstance(value, dict):  # a manifest fingerprint: its size and a short hash say enough
        digest = str(value.get("sha256") or value.get("etag") or "").strip('"')[:12]
        return f"{value.get('bytes')} bytes {digest}"
    return repr(value)


def _generations(old: dict[str, Any]) -> list[Generation]:
    if old.get("plan_version") == 1:  # one generation whose rows were never hashed: it continues only unchanged
        return [Generation(old["manifest"], 0, 0)]
    return [Generation(**gen) for gen in old.get("generations", [])]


def committed_shards(output: str, storage: Storage) -> set[str]:
    """Names of the shards with a commit marker."""
    return {name.rsplit("/", 1)[-1].removesuffix(".json")
            for name in storage.list(uri(output, COMMITTED)) if name.endswith(".json")}


def read_marker(output: str, shard: int, storage: Storage) -> dict[str, Any]:
    """A committed shard's marker."""
    return json.loads(storage.read_bytes(marker_uri(output, shard)))


def read_layout(output: str, storage: Storage) -> Layout:
    """The layout an output's _plan.json records (empty if it has none)."""
    data = storage.read_tagged(uri(output, PLAN))
    old = json.loads(data[0]) if data else {}
    return Layout(tuple(_generations(old)), old.get("shard_size", 1))


def url_key(url: str) -> bytes:
    """A URL as a 16-byte key (whitespace around the cell ignored, as the fetcher ignores it): millions fit."""
    return hashlib.blake2b(url.strip().encode(), digest_size=16).digest()


def row_digest(row: PlannedRow) -> bytes:
    """A planned row as hashed into its generation's rows_sha256: what the manifest says, not what a run
    decided about it (duplicates, --skip-seen), so the same rows hash equal whatever the options."""
    fields = asdict(row)
    fields.pop("duplicate_of"), fields.pop("seen_in")
    return (json.dumps(fields) + "\n").encode()


class _Planner:
    """Streams manifest rows into shard input files, deciding after the first shard's rows whether this run
    starts the output, repeats its plan, or continues it (the old rows hash equal and more follow)."""

    def __init__(self, config: ShardedJob, storage: Storage, pool: ThreadPoolExecutor, dedupe: bool,
                 seen: Mapping[bytes, str]) -> None:
        self.config, self.storage, self.pool = config, storage, pool
        self.first_of: dict[bytes, int] | None = {} if dedupe else None  # URL key -> row of its first row
        self.seen = seen
        self.where = uri(config.output, PLAN)
        self.todo: list[int] = []
        self.head: list[PlannedRow] | None = []  # the first shard's rows, until the plan is settled
        self.batch: list[PlannedRow] = []
        self.shard = 0
        self.digest = hashlib.sha256()
        self.rows = 0
        self.writes: deque[Future] = deque()
        self.tag: str | None = None
        self.old: list[Generation] = []  # the generations this run found
        self.known = 0  # rows the old generations planned: below it, rows are checked against their hash
        self.starts: dict[int, int] = {}  # first row -> first shard of each generation this run writes
        self.committed: set[str] = set()

    def add(self, row: PlannedRow) -> None:
        """One more manifest row, in order."""
        if self.head is not None:
            self.head.append(row)
            if len(self.head) == self.config.shard_size:
                self._settle()
            return
        self._take(row)

    def _take(self, row: PlannedRow) -> None:
        if self.rows == self.known and self.known and not self._same_rows():
            raise self._changed()
        self.digest.update(row_digest(row))
        self._mark(row)
        self.rows += 1
        if row.index < self.known:
            return  # an old generation's row, planned and hashed when it was new
        if row.index in self.starts:
            self._flush()
            self.shard = self.starts[row.index]
        self.batch.append(row)
        if len(self.batch) == self.config.shard_size:
            self._flush()
            self.shard += 1

    def _settle(self) -> None:
        head, self.head = self.head or [], None
        if head and all(r.error for r in head):
            # A misread manifest (wrong --url-column or --format), caught before anything is written.
            raise CaptioningError(self.config.manifest, f"its first {len(head)} rows are all malformed "
                                  f"({(head[0].error or '').split(': ', 1)[-1]}); check --format and --url-column")
        manifest = self.config.manifest
        self.manifest = describe_source(manifest, self.storage, bulk_output_format(manifest, self.storage))
        record = plan_record(self.config)
        self.tag = self.storage.create(self.where, json.dumps({**record, "generations": []}).encode())
        if self.tag is not None:
            if self.storage.list(uri(self.config.output, COMMITTED)):
                self.storage.delete(self.where)
                raise CaptioningError(self.config.output, "holds shards from a run without a plan record (an "
                                      "older version); use a new --output")
        else:
            data = self.storage.read_tagged(self.where)
            old, self.tag = (json.loads(data[0]), data[1]) if data else ({}, None)
            settings = {k: v for k, v in old.items() if k not in ("plan_version", "manifest", "generations")}
            mine = {k: v for k, v in record.items() if k != "plan_version"}
            changed = [f"{key} {_plan_value(settings.get(key))} -> {_plan_value(value)}"
                       for key, value in mine.items() if settings.get(key) != value]
            if changed:
                raise _refusal(self.config, changed)
            self.old = _generations(old)
            self.committed = committed_shards(self.config.output, self.storage)
            if self.old and self.old[-1].rows is None and old.get("plan_version") != 1:
                self.old.pop()  # its planning was cut short, so none of its shards ran: plan it anew
        last = self.old[-1] if self.old else None
        if last is None or last.manifest == self.manifest:
            self.starts = {g.first_row: g.first_shard for g in self.old} or {0: 0}  # plan as before, in place
        elif last.rows is None:  # planned by version 1, without a hash of its rows
            raise _refusal(self.config, [f"manifest {_plan_value(last.manifest)} -> {_plan_value(self.manifest)}"])
        else:
            old_layout = Layout(tuple(self.old), self.config.shard_size)
            self.known = old_layout.rows
            self.starts = {self.known: old_layout.shards}
        for row in head:
            self._take(row)

    def _mark(self, row: PlannedRow) -> None:
        # Old generations' rows are registered too: a URL that returns tonight shares last night's result.
        # The cell, not where it resolves: two cells naming one file may still differ in what the job allows.
        if row.error or not (row.url or "").strip():
            return
        key = url_key(row.url or "")
        if self.first_of is not None and (first := self.first_of.setdefault(key, row.row)) != row.row:
            row.duplicate_of = first
        if self.seen:
            row.seen_in = self.seen.get(key)

    def _same_rows(self) -> bool:
        return self.digest.copy().hexdigest() == self.old[-1].rows_sha256

    def _changed(self) -> CaptioningError:
        return _refusal(self.config, [f"manifest {_plan_value(self.old[-1].manifest)} -> "
                                      f"{_plan_value(self.manifest)}, its first {self.known} rows changed"])

    def _flush(self) -> None:
        batch, self.batch, shard = self.batch, [], self.shard
        if not batch:
            return
        if shard_name(shard) in self.committed:
            statuses = read_marker(self.config.output, shard, self.storage)["statuses"] \
                if self.config.retry_failed else []
            if any(status in TRANSIENT_REASONS for status in statuses):
                self.todo.append(shard)
            return
        # Parallel PUTs: a Conceptual Captions manifest is ~13,000 shards; a bounded queue keeps memory flat.
        self.writes.append(self.pool.submit(
            self.storage.write_bytes, input_uri(self.config.output, shard),
            "".join(json.dumps(asdict(r)) + "\n" for r in batch).encode(), "application/jsonl"))
        while len(self.writes) > 2 * PLAN_WRITERS:
            self.writes.popleft().result()
        self.todo.append(shard)

    def finish(self) -> Layout:
        """Write the last shard, check the old rows were all there, record the plan; the layout to run."""
        if self.head is not None:
            self._settle()
        self._flush()
        for write in self.writes:
            write.result()
        continued = False
        if self.known:  # the manifest changed: the old rows must all be there, unchanged
            if self.rows < self.known or not self._same_rows() and self.rows == self.known:
                raise self._changed()
            old = Layout(tuple(self.old), self.config.shard_size)
            # The old generations' shards were planned when they were new; those not committed are still to do.
            self.todo[:0] = [shard for shard in range(old.shards) if self._still_to_do(shard)]
            if self.rows > self.known:
                self.old.append(Generation(self.manifest, self.known, old.shards, self.rows - self.known,
                                           self.digest.hexdigest()))
                continued = True
        elif self.old:
            self.old[-1] = Generation(self.old[-1].manifest, self.old[-1].first_row, self.old[-1].first_shard,
                                      self.rows - self.old[-1].first_row, self.digest.hexdigest())
        else:
            self.old = [Generation(self.manifest, 0, 0, self.rows, self.digest.hexdigest())]
        self._record()
        return Layout(tuple(self.old), self.config.shard_size, continued)

    def _still_to_do(self, shard: int) -> bool:
        if shard_name(shard) not in self.committed:
            return True
        statuses = read_marker(self.config.output, shard, self.storage)["statuses"] if self.config.retry_failed else []
        return any(status in TRANSIENT_REASONS for status in statuses)

    def _record(self) -> None:
        record = {**plan_record(self.config), "generations": [asdict(g) for g in self.old]}
        data = json.dumps(record, indent=2).encode()
        # Runs hold the output's lease, so the plan changes only under this run: a lost race is a bug to report.
        if self.tag is None or self.storage.replace_if(self.where, data, self.tag) is None:
            raise CaptioningError(self.config.output, "_plan.json changed while this run planned; rerun")


def plan_shards(config: ShardedJob, storage: Storage, dedupe: bool = False,
                seen: Mapping[bytes, str] | None = None) -> tuple[list[int], Layout]:
    """Stream the manifest into per-shard input files; returns the shards to process and the output's layout.

    A committed shard is skipped, unless retry_failed is set and it holds transient failures. dedupe: rows whose
    URL an earlier row has get duplicate_of (fetched once); seen: url_key -> an earlier output that has it.
    """
    with ThreadPoolExecutor(PLAN_WRITERS) as pool:
        planner = _Planner(config, storage, pool, dedupe, seen or {})
        for row in iter_rows(config.manifest, config.spec, storage):
            # url is the cell as written (outputs trace back to it verbatim); source is where it resolves.
            planner.add(PlannedRow(row=row.row, index=planner.rows + len(planner.head or []), id=row.id,
                                   url=row.value, source=row.image,
                                   reference=row.captions[0] if row.captions else None,
                                   captions=list(row.captions), error=str(row.error) if row.error else None))
        layout = planner.finish()
    return planner.todo, layout


def read_planned(output: str, shard: int, storage: Storage) -> list[PlannedRow]:
    """A shard's planned input rows."""
    lines = storage.read_bytes(input_uri(output, shard)).decode().splitlines()
    return [PlannedRow(**json.loads(line)) for line in lines]
