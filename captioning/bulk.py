"""The captioning plug-in of the sharded-job engine (captioning/shards/): the caption stage, its output
schema and its writer. The Ray Data driver (jobs/driver.py) or the in-process runner does the rest.

Layout under the output URI:
  _plan.json                   what the output was planned from (shard size, columns, and per generation the
                               manifest's fingerprint and row hash): a rerun with anything else is refused, so
                               shards never mix two plans, unless rows were only appended (a new generation)
  _lease.json                  held by the run writing the output (captioning/lease.py)
  _input/shard-NNNNN.jsonl     the manifest rows of each shard (written by plan_shards; input of fetch)
  captions/shard-NNNNN.parquet one row per input row: id, url, caption, score, status, ...
  attention/shard-NNNNN.<attempt id>.npy  float16 (words, 7, 7) maps, rows address them by offset/length;
                               a new name per attempt, so rows kept from an earlier attempt keep their maps
  _committed/shard-NNNNN.json  commit marker, written last: a shard without one is redone on rerun; it holds
                               the shard's row range and its stage timings (captioning/shards/timings.py)
  shards/shard-NNNNN.tar       with --output-format webdataset, instead of captions/ and attention/: a sample per
                               row (captioning/webdataset.py)
  attention-png/<id>.png       optional overlays for the first --attention-png rows (unsafe ids are hashed)
  _SUCCESS.json                summary of the run
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from captioning.bulk_config import BulkConfig
from captioning.config import GenerationConfig
from captioning.errors import CaptioningError
from captioning.output_source import share_results
from captioning.shards.layout import PLAN, file_id, marker_uri, shard_name, uri
from captioning.shards.payloads import Committed, FetchedRow, FetchedShard, ShardRows
from captioning.shards.plan import committed_shards, read_marker, url_key
from captioning.shards.plugin import Log, Plugin
from captioning.shards.timings import StageClock, StageRecord, merge, stage_report
from captioning.shards.writer import commit_marker
from captioning.storage import Storage

# One output row per input row; every shard is written with exactly this schema.
OUTPUT_SCHEMA = pa.schema([
    ("row", pa.int64()), ("id", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("score", pa.float32()), ("status", pa.string()), ("error", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("fetch_seconds", pa.float32()), ("decode_seconds", pa.float32()),
    ("inference_seconds", pa.float32()),
    ("model_version", pa.string()), ("model", pa.string()), ("reference", pa.string()), ("attention_file", pa.string()),
    ("attention_offset", pa.int64()), ("attention_length", pa.int32()), ("attention_png", pa.string()),
    ("sha256", pa.string()), ("duplicate_of", pa.int64()), ("seen_in", pa.string()), ("image_file", pa.string()),
])
SCHEMA_FIELDS = tuple(OUTPUT_SCHEMA.names)
CAPTIONED_MEMORY = 500_000  # image hashes an actor remembers (about 70 MB) to caption equal bytes once per run


@dataclass
class CaptionedRow:
    """What the caption stage adds to one ok row."""

    row: int
    caption: str
    score: float
    inference_seconds: float
    attention_offset: int | None = None  # into the shard's attention array
    attention_length: int | None = None
    attention_png: str | None = None


@dataclass
class Captioned(ShardRows):
    """A shard after the caption stage: a caption per ok row, their attention maps stacked, the model version."""

    captions: list[CaptionedRow]
    attention: np.ndarray  # float16 (words of every captioned row, 7, 7)
    model_version: str


class CaptionShard:
    """Actor-side stage: loads the bundle once, then captions each shard's decoded images in batches."""

    def __init__(self, config: BulkConfig) -> None:
        self.started = time.time()  # before importing TensorFlow: its import is part of the actor's start-up
        from captioning.bundle import load_bundle  # noqa: PLC0415  (TensorFlow only inside the actors)
        from captioning.devices import has_gpu, resolve_batch_size, use_cpu_threads  # noqa: PLC0415
        from captioning.generate import Generator  # noqa: PLC0415

        use_cpu_threads(config.inference_threads, config.actor_cpus)  # before any TensorFlow op runs
        self.config = config
        self.storage = Storage(config.storage)
        self.batch_size = resolve_batch_size(config.batch_size)
        self._gpus = has_gpu()
        self.bundle = load_bundle(config.model, precision=config.precision, storage=self.storage)
        generation = GenerationConfig(**{**asdict(config.generation), "attention": config.attention})
        self.generator = Generator(self.bundle.model, generation)
        # Trace now (once for every batch size), so no shard pays for tracing.
        self.generator(self.bundle.backbone(np.zeros((1, config.image.size, config.image.size, 3), np.uint8)))
        self.captioned: dict[bytes, int] = {}  # sha256 of bytes captioned by this actor -> their row
        self.ready = time.time()

    def __call__(self, shard: FetchedShard) -> Captioned:
        clock = StageClock()
        images, good = self._not_yet_captioned(shard)
        captioned: list[CaptionedRow] = []
        maps: list[np.ndarray] = []
        offset = 0
        first: StageRecord | None = None  # when this shard's first captions were ready: start-up to first row
        for start in range(0, len(images), self.batch_size):
            began = time.perf_counter()
            with clock.measure("backbone"):
                features = self.bundle.backbone(images[start : start + self.batch_size])
                self._sync()
            with clock.measure("decoder"):
                out = self.generator(features)
            seconds = (time.perf_counter() - began) / len(out.captions)
            first = first or StageRecord("first_batch", clock.span[0], time.time())
            for i, caption in enumerate(out.captions):
                row = good[start + i]
                result = CaptionedRow(row.row, caption, float(out.scores[i]), seconds)
                if out.attention is not None:
                    attention = out.attention[i].astype(np.float16)
                    result.attention_offset, result.attention_length = offset, len(attention)
                    maps.append(attention)
                    offset += len(attention)
                    if row.index < self.config.attention_png:  # the first N data rows of the manifest
                        result.attention_png = self._overlay(images[start + i], caption, out.attention[i], row.id)
                captioned.append(result)
                if row.sha256 is not None:
                    self._remember(row)
        attention = np.concatenate(maps) if maps else np.zeros((0, 7, 7), np.float16)
        records = [clock.finish("caption"), self.init_record, *([first] if first else [])]
        return Captioned(**shard.passed_on(*records), captions=captioned,
                         attention=attention, model_version=self.bundle.version)

    def _not_yet_captioned(self, shard: FetchedShard) -> tuple[np.ndarray, list[FetchedRow]]:
        """The shard's images and ok rows, less those whose bytes this actor captioned in another row this run:
        those become duplicates of that row (the fetch stage did the same within the shard)."""
        good, keep = shard.good, []
        for i, row in enumerate(good):
            earlier = self.captioned.get(bytes.fromhex(row.sha256)) if row.sha256 else None
            if earlier is not None and earlier != row.row:
                row.status, row.duplicate_of, row.image_bytes = "duplicate", earlier, None
            else:
                keep.append(i)
        if len(keep) == len(good):
            return shard.images, good
        return shard.images[keep], [good[i] for i in keep]

    def _remember(self, row: FetchedRow) -> None:
        self.captioned[bytes.fromhex(row.sha256 or "")] = row.row
        if len(self.captioned) > CAPTIONED_MEMORY:  # the oldest first: dicts keep insertion order
            del self.captioned[next(iter(self.captioned))]

    @property
    def init_record(self) -> StageRecord:
        """The actor's start-up (model load and tracing) as a stage record."""
        return StageRecord("actor_init", self.started, self.ready)

    def _sync(self) -> None:
        # GPU kernels run asynchronously: wait for the backbone, or its time would show up as decoder time.
        if self._gpus:
            import tensorflow as tf  # noqa: PLC0415

            tf.test.experimental.sync_devices()

    def _overlay(self, image: np.ndarray, caption: str, attention: np.ndarray, row_id: str | None) -> str:
        """Write one overlay PNG; returns its path under the output."""
        from captioning.plots import plot_attention  # noqa: PLC0415

        buffer = io.BytesIO()
        plot_attention(image, caption.split(), attention, buffer, caption)
        # Idempotent: a redone shard rewrites the same file. Ids are manifest data: never a path as given.
        name = f"attention-png/{file_id(row_id or '')}.png"
        self.storage.write_bytes(uri(self.config.output, name), buffer.getvalue(), "image/png")
        return name


class CaptionWriter:
    """The Parquet + attention writer: captions/shard-N.parquet (OUTPUT_SCHEMA), attention/shard-N.<attempt>.npy,
    then the commit marker."""

    images = ""  # Parquet keeps no images

    def __init__(self, config: BulkConfig) -> None:
        self.config = config

    def previous(self, shard: int) -> tuple[int, pa.Table | None] | None:
        """The next attempt of a committed shard and its committed rows; None if it has no marker."""
        storage = Storage(self.config.storage)
        if not storage.exists(marker_uri(self.config.output, shard)):
            return None
        attempt = read_marker(self.config.output, shard, storage).get("attempt", 0) + 1
        return attempt, self.committed_rows(shard, storage)

    def committed_rows(self, shard: int, storage: Storage) -> pa.Table:
        """A shard's rows as its data file holds them."""
        data = storage.read_bytes(uri(self.config.output, "captions", f"{shard_name(shard)}.parquet"))
        return pq.read_table(io.BytesIO(data), schema=OUTPUT_SCHEMA)

    def write(self, processed: Captioned) -> Committed:
        """Write a shard's data, then its commit marker; returns the shard's counts."""
        config, clock = self.config, StageClock()
        storage = Storage(config.storage)
        name = shard_name(processed.shard)
        model = config.model_ref or config.model
        # Every attempt writes its own attention file, never one an earlier attempt wrote: rows kept from that
        # attempt (even one whose marker a crash never wrote) still point into theirs.
        attention_file = f"attention/{name}.{uuid.uuid4().hex[:12]}.npy"
        results = {c.row: c for c in processed.captions}
        fresh = []
        for row in processed.rows:
            result = results.get(row.row)
            has_map = result is not None and result.attention_length is not None
            fresh.append({**{k: None for k in SCHEMA_FIELDS}, **asdict(row), **(asdict(result) if result else {}),
                          "model_version": processed.model_version, "model": model,
                          "attention_file": attention_file if has_map else None})
        kept = processed.kept.to_pylist() if processed.kept is not None else []
        rows = sorted(kept + fresh, key=lambda r: r["row"])
        with clock.measure("write"):
            # Data first, marker last: a crash in between leaves a shard that the next run simply redoes.
            self.write_data(storage, processed, rows, {r["row"] for r in fresh}, attention_file)
        statuses = [r["status"] for r in rows]
        marker = {"shard": processed.shard, "rows": len(rows), "statuses": statuses,
                  "model_version": processed.model_version, "model": model,
                  "first_row": processed.first_row, "last_row": processed.last_row,
                  "attempt": processed.attempt, "committed": time.time(),
                  "images": len(processed.captions),  # captioned in this attempt
                  "timing": merge([*processed.timing, clock.finish("write")])}
        commit_marker(storage, marker_uri(config.output, processed.shard), marker, processed.attempt)
        ok = statuses.count("ok")
        return Committed(processed.shard, len(rows), ok, len(rows) - ok, len(fresh))

    def write_data(self, storage: Storage, processed: Captioned, rows: list[dict], fresh: set[int],
                   attention_file: str) -> None:
        """The shard's files: its Parquet rows, and this attempt's attention array if any row has maps."""
        buffer = io.BytesIO()
        table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA_FIELDS} for r in rows], schema=OUTPUT_SCHEMA)
        pq.write_table(table, buffer)
        if any(r["attention_file"] for r in rows if r["row"] in fresh):
            buffer_maps = io.BytesIO()
            np.save(buffer_maps, processed.attention, allow_pickle=False)
            storage.write_bytes(uri(self.config.output, attention_file), buffer_maps.getvalue(),
                                "application/octet-stream")
        storage.write_bytes(uri(self.config.output, "captions", f"{shard_name(processed.shard)}.parquet"),
                            buffer.getvalue())


class Captioning(Plugin):
    """Bulk captioning: a caption per manifest row, with attention maps, into Parquet."""

    what = "captioning batch run"
    kind = "batch"
    label = "captioning"
    stage_class = CaptionShard
    payload = Captioned
    writer_class = CaptionWriter
    dedupe_urls = True

    def configure(self, config: BulkConfig, storage: Storage, log: Log) -> BulkConfig:
        """The registry --model resolved once, paths absolute."""
        config = config.resolved(storage).with_absolute_paths()
        if config.model_ref.startswith("registry+"):
            log(f"model {config.model_ref}")
        return config

    def prepare(self, config: BulkConfig, storage: Storage) -> str:
        """Nothing to prepare; the plan line says whether failures are retried."""
        return " (retrying transient failures)" if config.retry_failed else ""

    def seen(self, config: BulkConfig, storage: Storage) -> dict[bytes, str]:
        """--skip-seen: every URL each earlier output captioned ok, to the first output that has it."""
        seen: dict[bytes, str] = {}
        for earlier in config.skip_seen:
            if earlier.rstrip("/") == config.output.rstrip("/"):
                raise CaptioningError(earlier, "is this run's own --output; --skip-seen names earlier outputs")
            if not storage.exists(uri(earlier, PLAN)):
                raise CaptioningError(earlier, "is not a bulk captioning output (no _plan.json)")
            for row in read_output(earlier, storage, shared=True, columns=["row", "url", "status", "duplicate_of"]):
                if row["status"] == "ok" and row["url"] is not None:
                    seen.setdefault(url_key(row["url"]), earlier)
        return seen

    def writer(self, config: BulkConfig) -> CaptionWriter:
        """The --output-format's writer."""
        if config.output_format == "webdataset":
            from captioning.webdataset import WebDatasetWriter  # noqa: PLC0415

            return WebDatasetWriter(config)
        return CaptionWriter(config)

    def buffered(self, config: BulkConfig) -> int:
        """--buffered-shards."""
        return config.buffered_shards

    def extra(self, config: BulkConfig, markers: list[dict], seconds: float, processed_rows: int,
              started: float) -> dict[str, Any]:
        """This run's rate and stage timings, and the models the output was captioned with."""
        this_run = [m for m in markers if m["committed"] >= started and "timing" in m]
        stages = stage_report([m["timing"] for m in this_run], sum(m["images"] for m in this_run), config.actors,
                              started)
        return {"rows_processed_this_run": processed_rows,
                "rows_per_second": processed_rows / seconds if seconds else 0.0, "stages": stages,
                "model_versions": sorted({m["model_version"] for m in markers}), "model": config.model,
                "model_ref": config.model_ref, "models": sorted({m.get("model") or "" for m in markers} - {""})}

    def report(self, summary: dict[str, Any], config: BulkConfig, log: Log) -> None:
        """Rows by status and rate; stage costs and the bound."""
        log(f"{summary['rows']} rows: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())
            + f"; {summary['rows_per_second']:.1f} rows/s this run; output {config.output}")
        if summary["stages"]:
            stages = summary["stages"]
            log("ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in stages["ms_per_image"].items())
                + f"; start-up {stages['startup_seconds']:.1f} s (first captions after "
                f"{stages['first_row_seconds'] or 0:.1f} s); bound by {stages['bound_by']} ({stages['why']})")


def output_format(output: str, storage: Storage) -> str:
    """An output's format, as its plan records it ("parquet" for outputs planned before the option)."""
    data = storage.read_tagged(uri(output, PLAN))
    return (json.loads(data[0]).get("output_format") if data else None) or "parquet"


def output_tables(output: str, storage: Storage, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each committed shard's rows as a table, shard by shard, whatever the output's format."""
    config = BulkConfig("", "", output, output_format=output_format(output, storage))
    writer = Captioning().writer(config)
    for name in sorted(committed_shards(output, storage)):
        table = writer.committed_rows(int(name.removeprefix("shard-")), storage)
        yield table.select(columns) if columns else table


def read_output(output: str, storage: Storage | None = None, shared: bool = False,
                columns: list[str] | None = None) -> Iterator[dict]:
    """Every committed output row, shard by shard (what users and tests read back). shared: a duplicate row
    comes with the result of the row it shares (caption, score, status, attention), keeping its own row, id, url
    and duplicate_of; columns: only these."""
    storage = storage or Storage()
    if not shared:
        for table in output_tables(output, storage, columns):
            yield from table.to_pylist()
        return
    yield from share_results([row for table in output_tables(output, storage, columns) for row in table.to_pylist()])


def attention_for(row: dict, output: str, storage: Storage | None = None) -> np.ndarray | None:
    """The (words, 7, 7) attention maps of one output row."""
    if not row.get("attention_file"):
        return None
    maps = np.load(io.BytesIO((storage or Storage()).read_bytes(uri(output, row["attention_file"]))),
                   allow_pickle=False)
    return maps[row["attention_offset"] : row["attention_offset"] + row["attention_length"]]
