"""The fetch stage: a shard's rows read (http(s), or what the job allows), decoded, and failures made statuses."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from captioning.errors import CaptioningError, FetchError, internal_error, redact
from captioning.fetch import TRANSIENT_REASONS, Fetcher
from captioning.images import DecodeBudget, decode_with_size, read_source
from captioning.manifest import SCHEME
from captioning.shards.payloads import FetchedRow, FetchedShard, PlannedRow, ShardInput
from captioning.shards import defaults
from captioning.shards.config import ShardedJob
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
    """Fetch and decode one row at a time, from many threads: a row's failure is its status, never an exception."""

    def __init__(self, config: ShardedJob, storage: Storage) -> None:
        self.config, self.storage = config, storage
        self.fetcher = Fetcher(config.fetch)
        self.budget = DecodeBudget(config.decode_memory)
        # CPU seconds the loading threads spent (their own thread clocks): wall times under contention say how
        # long a row waited, these what it cost.
        self.cpu = {"fetch_cpu": 0.0, "decode_cpu": 0.0}
        self._lock = threading.Lock()

    def _spent(self, work: str, since: float) -> None:
        with self._lock:
            self.cpu[work] += time.thread_time() - since

    def __call__(self, row: PlannedRow) -> tuple[FetchedRow, np.ndarray | None]:
        out = FetchedRow(**asdict(row))
        if row.error:
            out.status = "bad_row"
            return out, None
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            source = admit(row.url, row.source, self.config)
            data = read_source(source, self.fetcher, self.storage, max_bytes=self.config.fetch.max_bytes)
            out.fetch_seconds = time.perf_counter() - start
            self._spent("fetch_cpu", cpu)
            start, cpu = time.perf_counter(), time.thread_time()
            image, (out.width, out.height) = decode_with_size(data, redact(source), self.config.image, self.budget)
            out.decode_seconds = time.perf_counter() - start
            self._spent("decode_cpu", cpu)
            return out, image
        except CaptioningError as err:
            out.status, out.error = err.reason, str(err)
        except Exception as err:  # noqa: BLE001  (one row's surprise must never fail the shard)
            out.status, out.error = "internal_error", internal_error(err, row.url or "")
        spent = time.perf_counter() - start  # since the fetch began, or since decoding began if it got that far
        if out.fetch_seconds:
            out.decode_seconds = spent
        else:
            out.fetch_seconds = spent
        out.width = out.height = None
        self._spent("decode_cpu" if out.fetch_seconds else "fetch_cpu", cpu)
        return out, None


def lower_priority(niceness: int = defaults.FETCH_NICENESS) -> None:
    """Make the calling thread yield the CPU to the model stage (Linux: a thread's own nice value).

    The model actors are the scarce stage and fetching has shards of slack, yet on a busy node the kernel shares
    the cores evenly: a fetch pool decoding beside an actor that imports TensorFlow or runs the backbone slows
    that actor, and with it the job. Only the pool's own threads are lowered (they end with the shard), so the
    worker process, which Ray may later give to an actor, keeps its priority.
    """
    if niceness and hasattr(os, "setpriority"):
        try:
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, max(niceness, os.getpriority(os.PRIO_PROCESS, thread)))
        except OSError:
            pass  # not permitted here: fetch at normal priority


def fetch_shard(item: ShardInput, config: ShardedJob, writer: Writer) -> FetchedShard:
    """Fetch and decode every row of one shard, many requests at once; failures become row statuses.

    On a --retry-failed attempt of a committed shard, only its transient failures are fetched again; the writer
    gives back the other rows as it committed them.
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
    load = RowLoader(config, storage)
    with ThreadPoolExecutor(config.fetch_threads, initializer=lower_priority) as pool:
        loaded = list(pool.map(load, [r for r in rows if r.row not in keep]))
    images = [image for _, image in loaded if image is not None]
    for work in ("fetch", "decode"):
        clock.add(work, sum(getattr(row, f"{work}_seconds") for row, _ in loaded))
    for work, seconds in load.cpu.items():
        clock.add(work, seconds)
    size = config.image.size
    return FetchedShard(shard=item.shard, attempt=attempt, first_row=rows[0].index, last_row=rows[-1].index,
                        rows=[row for row, _ in loaded],
                        images=np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                        kept=kept, timing=[clock.finish("fetch")])
