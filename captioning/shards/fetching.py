"""The fetch stage: a shard's rows read (http(s), or what the job allows), decoded, and failures made statuses."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from captioning.errors import CaptioningError, FetchError, internal_error, redact
from captioning.fetch import TRANSIENT_REASONS, Fetcher, failure_kind, is_url
from captioning.hosts.gate import SYSTEMIC_KINDS, Link, Politeness, in_turns, through_pauses
from captioning.images import DecodeBudget, decode_with_size, encode_jpeg, read_source
from captioning.manifest import SCHEME
from captioning.shards.payloads import FetchedRow, FetchedShard, PlannedRow, ShardInput
from captioning.shards import defaults
from captioning.shards.config import ShardedJob
from captioning.shards.metrics import NO_METRICS, Metrics, observe_rows
from captioning.shards.plan import read_planned
from captioning.shards.timings import StageClock
from captioning.shards.writer import Writer
from captioning.storage import Storage


def admit(url: str | None, source: str | None, config: ShardedJob) -> str:
    """The source to read for a row (its url cell, and where that resolves), or a FetchError (bad_url,
    unsupported_scheme): a URL job reads only URLs."""
    value = (url or "").strip()
    scheme = SCHEME.match(value)
    name = scheme.group(0)[:-3].lower() if scheme else ""
    if name in ("http", "https"):
        return value
    if name == "s3":
        if config.allow_s3_sources:
            return value
        raise FetchError(redact(value), "s3:// rows are read only with --allow-s3-sources", "unsupported_scheme")
    if name == "file" or not scheme:
        if config.allow_local_files:
            return source or ""
        if name == "file":
            raise FetchError(redact(value), "local files are read only with --allow-local-files",
                             "unsupported_scheme")
        raise FetchError(redact(value), "not an http(s) URL (local paths are read only with --allow-local-files)",
                         "bad_url")
    raise FetchError(redact(value), f"unsupported scheme {name!r} (only http and https)", "unsupported_scheme")


class RowLoader:
    """Fetch, then decode, one row at a time, from many threads: a row's failure is its status, never an exception.

    fetch() is I/O only, for the many fetch threads; decode() is the CPU work, for a pool as small as the cores:
    32 threads each decoding beside their downloads hand the GIL over so often on busy cores that decoding cost
    9 core-ms per image in the job against 1 alone (benchmarks/bulk_cc.py, 2026-12-02).
    """

    def __init__(self, config: ShardedJob, storage: Storage, keep: str = "", gate: Politeness | None = None) -> None:
        """keep: the image bytes an ok row carries on: "original" (as fetched), "model" (its view, as JPEG), "";
        gate: the job's per-host politeness (None: none)."""
        self.config, self.storage, self.keep, self.gate = config, storage, keep, gate
        self.fetcher = Fetcher(config.fetch, gate)
        self.kinds: dict[int, str] = {}  # row -> the kind of its fetch failure (systemic ones are fetched again)
        self.fetched_bytes = 0
        self.budget = DecodeBudget(config.decode_memory)
        # CPU seconds the loading threads spent (their own thread clocks): wall times under contention say how
        # long a row waited, these what it cost.
        self.cpu = {"fetch_cpu": 0.0, "decode_cpu": 0.0}
        self._lock = threading.Lock()

    def _spent(self, work: str, since: float) -> None:
        with self._lock:
            self.cpu[work] += time.thread_time() - since

    def fetch(self, row: PlannedRow) -> tuple[FetchedRow, bytes | None, str]:
        """The row's bytes (None when it failed: its status says why) and the source they came from."""
        out = FetchedRow(**asdict(row))
        if row.error:
            out.status = "bad_row"
            return out, None, ""
        if row.seen_in or row.duplicate_of is not None:  # another row's result, here or in an earlier output
            out.status = "seen" if row.seen_in else "duplicate"
            return out, None, ""
        start, cpu = time.perf_counter(), time.thread_time()
        source, data = "", None

        def attempt() -> tuple[str, bytes]:
            source = admit(row.url, row.source, self.config)
            if self.gate is not None and is_url(source):
                self.gate.allowed(source, self.fetcher)
            return source, read_source(source, self.fetcher, self.storage, max_bytes=self.config.fetch.max_bytes)

        try:
            source, data = through_pauses(self.gate, attempt)
            out.status, out.error, out.sha256 = "ok", None, hashlib.sha256(data).hexdigest()
            self.kinds.pop(row.row, None)
        except CaptioningError as err:
            out.status, out.error = err.reason, str(err)
            self.kinds[row.row] = failure_kind(err)
        except Exception as err:  # noqa: BLE001  (one row's surprise must never fail the shard)
            out.status, out.error = "internal_error", internal_error(err, row.url or "")
        if data is not None:
            with self._lock:
                self.fetched_bytes += len(data)
        out.fetch_seconds = time.perf_counter() - start
        self._spent("fetch_cpu", cpu)
        return out, data, source

    def decode(self, out: FetchedRow, data: bytes | None, source: str) -> tuple[FetchedRow, np.ndarray | None]:
        """The fetched row decoded to the model's input, or its failure as its status."""
        if data is None:
            return out, None
        start, cpu = time.perf_counter(), time.thread_time()
        image = None
        try:
            image, (out.width, out.height) = decode_with_size(data, redact(source), self.config.image, self.budget)
        except CaptioningError as err:
            out.status, out.error = err.reason, str(err)
        except Exception as err:  # noqa: BLE001
            out.status, out.error = "internal_error", internal_error(err, out.url or "")
        if image is None:
            out.width = out.height = None
        elif self.keep:
            out.image_bytes = data if self.keep == "original" else encode_jpeg(image)
        out.decode_seconds = time.perf_counter() - start
        self._spent("decode_cpu", cpu)
        return out, image

    def __call__(self, row: PlannedRow) -> tuple[FetchedRow, np.ndarray | None]:
        """fetch() then decode(), in the calling thread."""
        return self.decode(*self.fetch(row))


def lower_priority(niceness: int = defaults.FETCH_NICENESS) -> None:
    """Make the calling thread yield the CPU to the model stage (Linux: a thread's own nice value), niceness
    steps below its process (at most 19).

    The model actors are the scarce stage and fetching has shards of slack, yet on a busy node the kernel shares
    the cores evenly: a fetch pool decoding beside an actor that imports TensorFlow or runs the backbone slows
    that actor, and with it the job. Relative to the process, because Ray starts every worker, actors included,
    at nice 15: an absolute 10 would leave the fetch threads level with the actor. Only the pool's own threads
    are lowered (they end with the shard), so the worker process, which Ray may later give to an actor, keeps
    its priority.
    """
    if niceness and hasattr(os, "setpriority"):
        try:
            thread = threading.get_native_id()
            target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + niceness)
            os.setpriority(os.PRIO_PROCESS, thread, max(target, os.getpriority(os.PRIO_PROCESS, thread)))
        except OSError:
            pass  # not permitted here: fetch at normal priority


def same_bytes_once(loaded: list[tuple[FetchedRow, np.ndarray | None]]) -> list[tuple[FetchedRow, np.ndarray | None]]:
    """Rows whose bytes equal an earlier ok row's in the shard become its duplicates: captioned once."""
    first: dict[str, int] = {}
    out = []
    for row, image in loaded:
        if row.ok and row.sha256 is not None:
            if (earlier := first.setdefault(row.sha256, row.row)) != row.row:
                row.status, row.duplicate_of, row.image_bytes, image = "duplicate", earlier, None, None
        out.append((row, image))
    return out


def by_host(rows: list[PlannedRow]) -> list[PlannedRow]:
    """A shard's rows in turns over their hosts."""
    return in_turns(rows, lambda row: row.url or "")


def polite_gate(config: ShardedJob, rows: list[PlannedRow], link: Link | None) -> Politeness | None:
    """The shard's gate to the job's host ledger, when the job has politeness rules and the shard a URL."""
    if link is None or not config.politeness.active or not any(is_url((r.url or "").strip()) for r in rows):
        return None
    return Politeness(config.politeness, link, config.fetch.user_agent)


def fetch_shard(item: ShardInput, config: ShardedJob, writer: Writer, link: Link | None = None,
                metrics: Metrics = NO_METRICS) -> FetchedShard:
    """Fetch and decode every row of one shard, many requests at once; failures become row statuses.

    On a --retry-failed attempt of a committed shard, only its transient failures are fetched again; the writer
    gives back the other rows as it committed them. link: the job's host ledger (per-host politeness).
    """
    clock = StageClock()
    storage = Storage(config.storage)
    rows = read_planned(config.output, item.shard, storage)
    attempt, kept = 0, None
    previous = writer.previous(item.shard) if config.retry_failed else None
    if previous is not None:
        attempt, table = previous
        if table is not None:
            kept = table.filter(pc.invert(pc.is_in(table["status"], pa.array(sorted(TRANSIENT_REASONS)))))
    keep = set(kept["row"].to_pylist()) if kept is not None else set()
    todo = [r for r in rows if r.row not in keep]
    gate = polite_gate(config, todo, link)
    load = RowLoader(config, storage, getattr(writer, "images", ""), gate)
    try:
        loaded = _load(load, todo, config)
        if gate is not None and gate.suspect:
            # Rows that failed our side before the job noticed: once more, now that it has paused.
            again = [r for r in todo if load.kinds.get(r.row) in SYSTEMIC_KINDS]
            if again:
                redone = {r.row: (r, image) for r, image in _load(load, by_host(again), config)}
                loaded = [redone.get(r.row, (r, image)) for r, image in loaded]
    finally:
        figures = gate.close() if gate is not None else {}
    loaded = same_bytes_once(sorted(loaded, key=lambda pair: pair[0].row))
    images = [image for _, image in loaded if image is not None]
    for work in ("fetch", "decode"):
        clock.add(work, sum(getattr(row, f"{work}_seconds") for row, _ in loaded))
    for work, seconds in load.cpu.items():
        clock.add(work, seconds)
    clock.count("bytes_fetched", load.fetched_bytes)
    for name, value in figures.items():
        clock.count(name, value)
    observe_rows(metrics, [row for row, _ in loaded], load.fetched_bytes, figures)
    size = config.image.size
    return FetchedShard(shard=item.shard, attempt=attempt, first_row=rows[0].index, last_row=rows[-1].index,
                        rows=[row for row, _ in loaded],
                        images=np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                        kept=kept, timing=[clock.finish("fetch")])


def _load(load: RowLoader, rows: list[PlannedRow], config: ShardedJob) -> list[tuple[FetchedRow, np.ndarray | None]]:
    """Fetch and decode rows on the shard's pools."""
    with ThreadPoolExecutor(config.fetch_threads, initializer=lower_priority) as fetch_pool, \
            ThreadPoolExecutor(defaults.DECODE_THREADS, initializer=lower_priority) as decode_pool:
        # Each row goes to the decoders as soon as its bytes arrive. At most fetch_threads bodies are held
        # between download and decode, as when each thread decoded its own.
        held = threading.BoundedSemaphore(config.fetch_threads)

        def decode_and_release(*fetched: Any) -> tuple[FetchedRow, np.ndarray | None]:
            try:
                return load.decode(*fetched)
            finally:
                held.release()

        def fetch_then_decode(row: PlannedRow) -> Future | tuple[FetchedRow, None]:
            held.acquire()
            try:
                fetched = load.fetch(row)
            except BaseException:
                held.release()
                raise
            if fetched[1] is None:  # failed (most rows of a scraped manifest): nothing to decode
                held.release()
                return fetched[0], None
            return decode_pool.submit(decode_and_release, *fetched)

        decoding = list(fetch_pool.map(fetch_then_decode, by_host(rows) if load.gate is not None else rows))
        return [d.result() if isinstance(d, Future) else d for d in decoding]
