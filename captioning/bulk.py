"""Bulk captioning stages, each a plain function or callable class (Ray Data wires them in jobs/batch.py).

Layout under the output URI:
  _plan.json                   what the output was planned from (manifest fingerprint, shard size, columns):
                               a rerun with anything else is refused, so shards never mix two plans
  _lease.json                  held by the run writing the output (captioning/lease.py)
  _input/shard-NNNNN.jsonl     the manifest rows of each shard (written by plan_shards; input of fetch)
  captions/shard-NNNNN.parquet one row per input row: id, url, caption, score, status, ...
  attention/shard-NNNNN.<attempt id>.npy  float16 (words, 7, 7) maps, rows address them by offset/length;
                               a new name per attempt, so rows kept from an earlier attempt keep their maps
  _committed/shard-NNNNN.json  commit marker, written last: a shard without one is redone on rerun; it holds
                               the shard's row range and its stage timings (captioning/stage_timings.py)
  attention-png/<id>.png       optional overlays for the first --attention-png rows (unsafe ids are hashed)
  _SUCCESS.json                summary of the run
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from captioning.config import BULK_IMAGE, FetchConfig, GenerationConfig, ImageConfig, StorageConfig
from captioning.errors import CaptioningError, FetchError, internal_error, redact
from captioning.fetch import TRANSIENT_REASONS, Fetcher
from captioning.images import DecodeBudget, decode_with_size, read_source
from captioning.manifest import SCHEME, ManifestSpec, iter_rows
from captioning.stage_timings import StageClock, merge
from captioning.storage import Storage, absolute

# One output row per input row; every shard is written with exactly this schema.
OUTPUT_SCHEMA = pa.schema([
    ("row", pa.int64()), ("id", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("score", pa.float32()), ("status", pa.string()), ("error", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("fetch_seconds", pa.float32()), ("decode_seconds", pa.float32()),
    ("inference_seconds", pa.float32()),
    ("model_version", pa.string()), ("model", pa.string()), ("reference", pa.string()), ("attention_file", pa.string()),
    ("attention_offset", pa.int64()), ("attention_length", pa.int32()), ("attention_png", pa.string()),
])
SCHEMA_FIELDS = tuple(OUTPUT_SCHEMA.names)
PLAN_WRITERS = 16  # concurrent shard-input writes while planning
PLAN_VERSION = 1
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class BulkConfig:
    """Everything one bulk run needs; built by the CLI, shipped to every stage."""

    manifest: str
    model: str
    output: str
    spec: ManifestSpec = field(default_factory=lambda: ManifestSpec(image_column="url"))
    shard_size: int = 256
    batch_size: int | None = None  # None: the fastest size for the device (captioning/devices.py)
    actors: int = 1
    actor_cpus: float = 1.0  # CPUs Ray reserves per captioning actor; fetch and write tasks need some left
    inference_threads: int | None = None  # TensorFlow op threads per actor; None: all CPUs of its node
    num_gpus: float = 0.0
    fetch_threads: int = 32
    buffered_shards: int = 8  # decoded shards held in Ray's object store per captioning actor: bounds memory
    attention: bool = True
    attention_png: int = 0
    retry_failed: bool = False
    precision: str = "auto"
    allow_local_files: bool = False  # read manifest rows that are local paths or file:// (off: a URL job)
    allow_s3_sources: bool = False  # read s3:// rows with the job's own credentials (off: a URL job)
    decode_memory: int = 512 * 1024 * 1024  # decoded-pixel bytes one fetch task may hold at once
    lease_stale_after: float = 120.0  # seconds without a heartbeat before another run may take the output
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=lambda: BULK_IMAGE)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model_ref: str = ""  # the --model as resolved once (registry+URI@vNNNN), kept in every row; "": model itself

    def with_absolute_paths(self) -> "BulkConfig":
        """The same run with local manifest/model/output paths made absolute, as Ray workers need."""
        return replace(self, manifest=absolute(self.manifest), model=absolute(self.model), output=absolute(self.output),
                       model_ref=self.model_ref or absolute(self.model))

    def resolved(self, storage: Storage) -> "BulkConfig":
        """The same run with a registry --model resolved, once, to one version's bundle."""
        from captioning.registry import resolve_model  # noqa: PLC0415

        found = resolve_model(self.model, storage)
        return replace(self, model=found.bundle, model_ref=found.ref)

    def plan_extra(self) -> dict[str, Any]:
        """Nothing beyond the shared plan fields decides a bulk run's shards."""
        return {}


class ShardedJob(Protocol):
    """What plan_shards and fetch_shard read of a job's config: the bulk job's and the features job's fields."""

    manifest: str
    output: str
    spec: ManifestSpec
    shard_size: int
    retry_failed: bool
    fetch_threads: int
    allow_local_files: bool
    allow_s3_sources: bool
    decode_memory: int
    fetch: FetchConfig
    image: ImageConfig
    storage: StorageConfig

    def plan_extra(self) -> dict[str, Any]:
        """Job-specific plan fields: a rerun that changes any of them is refused."""


def uri(output: str, *parts: str) -> str:
    """Join an output URI and path parts."""
    return "/".join([output.rstrip("/"), *parts])


def shard_name(shard: int) -> str:
    """File stem of a shard."""
    return f"shard-{shard:05d}"


def file_id(row_id: str) -> str:
    """A row id as a file name: kept when plainly safe, else hashed (ids come from the manifest)."""
    if SAFE_ID.match(row_id) and row_id not in (".", ".."):
        return row_id
    return "id-" + hashlib.sha256(row_id.encode()).hexdigest()[:20]


def plan_record(config: ShardedJob, storage: Storage) -> dict[str, Any]:
    """What decides which rows land in which shard: the manifest's content, the shard size and the columns."""
    spec = config.spec
    return {"plan_version": PLAN_VERSION, "manifest": storage.describe(config.manifest),
            "shard_size": config.shard_size, "format": spec.format, "url_column": spec.image_column,
            "caption_column": spec.caption_column, "id_column": spec.id_column, **config.plan_extra()}


def check_plan(config: ShardedJob, storage: Storage) -> None:
    """Record the plan on a first run; refuse a rerun whose plan differs, before any work."""
    plan = plan_record(config, storage)
    where = uri(config.output, "_plan.json")
    if storage.create(where, json.dumps(plan, indent=2).encode()):
        if storage.list(uri(config.output, "_committed")):
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


def plan_shards(config: ShardedJob, storage: Storage) -> tuple[list[int], int]:
    """Stream the manifest into per-shard input files; returns the shards to process and the total row count.

    A committed shard is skipped, unless retry_failed is set and it holds transient failures.
    """
    committed: set[str] | None = None  # known once the plan is checked, after the first shard's rows
    todo, rows, batch, shard = [], 0, [], 0
    writes: deque[Future] = deque()

    def flush(shard: int, batch: list[dict]) -> None:
        nonlocal committed
        if committed is None:
            if all(r["error"] for r in batch):
                # A misread manifest (wrong --url-column or --format), caught before anything is written.
                raise CaptioningError(config.manifest, f"its first {len(batch)} rows are all malformed "
                                      f"({batch[0]['error'].split(': ', 1)[-1]}); check --format and --url-column")
            check_plan(config, storage)
            committed = {name.rsplit("/", 1)[-1].removesuffix(".json")
                         for name in storage.list(uri(config.output, "_committed")) if name.endswith(".json")}
        name = shard_name(shard)
        if name in committed:
            if config.retry_failed and _has_transient(config, storage, shard):
                todo.append(shard)
            return
        # Parallel PUTs: a Conceptual Captions manifest is ~13,000 shards; a bounded queue keeps memory flat.
        writes.append(pool.submit(storage.write_bytes, uri(config.output, "_input", f"{name}.jsonl"),
                                  "".join(json.dumps(r) + "\n" for r in batch).encode(), "application/jsonl"))
        while len(writes) > 2 * PLAN_WRITERS:
            writes.popleft().result()
        todo.append(shard)

    with ThreadPoolExecutor(PLAN_WRITERS) as pool:
        for row in iter_rows(config.manifest, config.spec, storage):
            # url is the cell as written (outputs trace back to it verbatim); source is where it resolves.
            batch.append({"row": row.row, "index": rows, "id": row.id, "url": row.value, "source": row.image,
                          "reference": row.captions[0] if row.captions else None, "captions": list(row.captions),
                          "error": str(row.error) if row.error else None})
            rows += 1
            if len(batch) == config.shard_size:
                flush(shard, batch)
                batch, shard = [], shard + 1
        if batch:
            flush(shard, batch)
        for write in writes:
            write.result()
    return todo, rows


def _has_transient(config: ShardedJob, storage: Storage, shard: int) -> bool:
    marker = json.loads(storage.read_bytes(uri(config.output, "_committed", f"{shard_name(shard)}.json")))
    return any(status in TRANSIENT_REASONS for status in marker["statuses"])


def admit(row: dict[str, Any], config: ShardedJob) -> str:
    """The source to read for a row, or a FetchError (bad_url, unsupported_scheme): a URL job reads only URLs."""
    value = (row["url"] or "").strip()
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
            return row["source"]
        if name == "file":
            raise FetchError(redact(value), "local files are read only with --allow-local-files",
                             "unsupported_scheme")
        raise FetchError(redact(value), "not an http(s) URL (local paths are read only with --allow-local-files)",
                         "bad_url")
    raise FetchError(redact(value), f"unsupported scheme {name!r} (only http and https)", "unsupported_scheme")


def fetch_shard(item: dict[str, Any], config: ShardedJob) -> dict[str, Any]:
    """Fetch and decode every row of one shard, many requests at once; failures become row statuses."""
    clock = StageClock()
    storage = Storage(config.storage)
    shard = int(item["shard"])
    rows = [json.loads(line) for line in
            storage.read_bytes(uri(config.output, "_input", f"{shard_name(shard)}.jsonl")).decode().splitlines()]
    keep: dict[int, dict] = {}
    attempt = 0
    marker = uri(config.output, "_committed", f"{shard_name(shard)}.json")
    if config.retry_failed and storage.exists(marker):
        attempt = json.loads(storage.read_bytes(marker)).get("attempt", 0) + 1
        previous = _read_previous(config, storage, shard)
        keep = {r["row"]: r for r in previous if r["status"] not in TRANSIENT_REASONS}
    fetcher = Fetcher(config.fetch)
    budget = DecodeBudget(config.decode_memory)

    def load(row: dict) -> tuple[dict, np.ndarray | None]:
        out = {**row, "status": "ok", "error": None, "width": None, "height": None, "fetch_seconds": 0.0,
               "decode_seconds": 0.0}
        if row["error"]:
            return {**out, "status": "bad_row", "error": row["error"]}, None
        start = time.perf_counter()
        try:
            source = admit(row, config)
            data = read_source(source, fetcher, storage, max_bytes=config.fetch.max_bytes)
            out["fetch_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            image, (width, height) = decode_with_size(data, redact(source), config.image, budget)
            return {**out, "width": width, "height": height, "decode_seconds": time.perf_counter() - start}, image
        except CaptioningError as err:
            status, error = err.reason, str(err)
        except Exception as err:  # noqa: BLE001  (one row's surprise must never fail the shard)
            status, error = "internal_error", internal_error(err, row["url"] or "")
        spent = time.perf_counter() - start  # since the fetch began, or since decoding began if it got that far
        return {**out, "status": status, "error": error,
                **({"decode_seconds": spent} if out["fetch_seconds"] else {"fetch_seconds": spent})}, None

    todo = [r for r in rows if r["row"] not in keep]
    with ThreadPoolExecutor(config.fetch_threads) as pool:
        loaded = list(pool.map(load, todo))
    images = [image for _, image in loaded if image is not None]
    for work in ("fetch", "decode"):
        clock.add(work, sum(meta[f"{work}_seconds"] for meta, _ in loaded))
    return {
        "shard": shard,
        "attempt": attempt,
        "range": json.dumps([rows[0]["index"], rows[-1]["index"]]),
        "rows": json.dumps([meta for meta, _ in loaded]),
        "kept": json.dumps(list(keep.values())),
        "images": np.stack(images).tobytes() if images else b"",
        "image_count": len(images),
        "timing": json.dumps([["fetch", clock.finish()]]),
    }


def shard_images(item: dict[str, Any], size: int) -> np.ndarray | None:
    """The decoded images fetch_shard packed into an item: uint8 (count, size, size, 3), or None if none."""
    count = int(item["image_count"])
    return np.frombuffer(item["images"], np.uint8).reshape(count, size, size, 3) if count else None


def _read_previous(config: ShardedJob, storage: Storage, shard: int) -> list[dict]:
    data = storage.read_bytes(uri(config.output, "captions", f"{shard_name(shard)}.parquet"))
    return pq.read_table(io.BytesIO(data)).to_pylist()


class CaptionShard:
    """Actor-side stage: loads the bundle once, then captions each shard's decoded images in batches."""

    def __init__(self, config: BulkConfig) -> None:
        from captioning.bundle import load_bundle  # noqa: PLC0415  (TensorFlow only inside the actors)
        from captioning.devices import has_gpu, resolve_batch_size, use_cpu_threads  # noqa: PLC0415
        from captioning.generate import Generator  # noqa: PLC0415

        self.started = time.time()
        use_cpu_threads(config.inference_threads)  # before any TensorFlow op runs
        self.config = config
        self.batch_size = resolve_batch_size(config.batch_size)
        self._gpus = has_gpu()
        self.bundle = load_bundle(config.model, precision=config.precision, storage=Storage(config.storage))
        generation = GenerationConfig(**{**asdict(config.generation), "attention": config.attention})
        self.generator = Generator(self.bundle.model, generation)
        # Trace now (once for every batch size), so no shard pays for tracing.
        self.generator(self.bundle.backbone(np.zeros((1, config.image.size, config.image.size, 3), np.uint8)))
        self.ready = time.time()

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        clock = StageClock()
        count = int(item["image_count"])
        images = shard_images(item, self.config.image.size)
        rows = json.loads(item["rows"])
        good = [r for r in rows if r["status"] == "ok"]
        maps: list[np.ndarray] = []
        offset = 0
        for start in range(0, count, self.batch_size):
            began = time.perf_counter()
            with clock.measure("backbone"):
                features = self.bundle.backbone(images[start : start + self.batch_size])
                self._sync()
            with clock.measure("decoder"):
                out = self.generator(features)
            seconds = (time.perf_counter() - began) / len(out.captions)
            for i, caption in enumerate(out.captions):
                row = good[start + i]
                row.update(caption=caption, score=float(out.scores[i]), inference_seconds=seconds)
                if out.attention is not None:
                    attention = out.attention[i].astype(np.float16)
                    row.update(attention_offset=offset, attention_length=len(attention))
                    maps.append(attention)
                    offset += len(attention)
                    if row["index"] < self.config.attention_png:  # the first N data rows of the manifest
                        row["attention_png"] = self._overlay(images[start + i], caption, out.attention[i], row["id"])
        attention = np.concatenate(maps) if maps else np.zeros((0, 7, 7), np.float16)
        buffer = io.BytesIO()
        np.save(buffer, attention, allow_pickle=False)
        timing = [*json.loads(item["timing"]), ["caption", clock.finish()], ["actor_init", self.init_record]]
        return {"shard": item["shard"], "attempt": item["attempt"], "range": item["range"], "rows": json.dumps(rows),
                "kept": item["kept"],
                "attention": buffer.getvalue(), "model_version": self.bundle.version, "timing": json.dumps(timing)}

    @property
    def init_record(self) -> dict:
        """The actor's start-up (model load and tracing) as a stage record."""
        return {"span": [self.started, self.ready], "seconds": {}}

    def _sync(self) -> None:
        # GPU kernels run asynchronously: wait for the backbone, or its time would show up as decoder time.
        if self._gpus:
            import tensorflow as tf  # noqa: PLC0415

            tf.test.experimental.sync_devices()

    def _overlay(self, image: np.ndarray, caption: str, attention: np.ndarray, row_id: str) -> str:
        """Write one overlay PNG; returns its path under the output."""
        from captioning.plots import plot_attention  # noqa: PLC0415

        buffer = io.BytesIO()
        plot_attention(image, caption.split(), attention, buffer, caption)
        # Idempotent: a redone shard rewrites the same file. Ids are manifest data: never a path as given.
        name = f"attention-png/{file_id(row_id)}.png"
        Storage(self.config.storage).write_bytes(uri(self.config.output, name), buffer.getvalue(), "image/png")
        return name


def write_shard(item: dict[str, Any], config: BulkConfig) -> dict[str, Any]:
    """Write a shard's Parquet and attention file, then its commit marker; returns the shard's counts."""
    clock = StageClock()
    storage = Storage(config.storage)
    shard, name = int(item["shard"]), shard_name(int(item["shard"]))
    attempt = int(item["attempt"])
    # Every attempt writes its own attention file, never one an earlier attempt wrote: rows kept from that
    # attempt (even one whose marker a crash never wrote) still point into theirs.
    attention_file = f"attention/{name}.{uuid.uuid4().hex[:12]}.npy"
    fresh = []
    for row in json.loads(item["rows"]):
        has_map = row.get("attention_length") is not None
        fresh.append({**{k: None for k in SCHEMA_FIELDS}, **row, "model_version": item["model_version"],
                      "model": config.model_ref or config.model,
                      "attention_file": attention_file if has_map else None})
    rows = sorted(json.loads(item["kept"]) + fresh, key=lambda r: r["row"])
    rows = [{k: r.get(k) for k in SCHEMA_FIELDS} for r in rows]
    with clock.measure("write"):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buffer)
        # Data first, marker last: a crash in between leaves a shard that the next run simply redoes.
        if fresh and any(r["attention_file"] for r in fresh):
            storage.write_bytes(uri(config.output, attention_file), item["attention"], "application/octet-stream")
        storage.write_bytes(uri(config.output, "captions", f"{name}.parquet"), buffer.getvalue())
    statuses = [r["status"] for r in rows]
    first, last = json.loads(item["range"])
    marker = {"shard": shard, "rows": len(rows), "statuses": statuses, "model_version": item["model_version"],
              "model": config.model_ref or config.model,
              "first_row": first, "last_row": last,  # positions in the manifest, checked before _SUCCESS.json
              "attempt": attempt, "committed": time.time(),
              "images": sum(r["caption"] is not None for r in fresh),  # captioned in this attempt
              "timing": merge(*json.loads(item["timing"]), ["write", clock.finish()])}
    commit_marker(storage, uri(config.output, "_committed", f"{name}.json"), marker, attempt)
    return {"shard": shard, "rows": len(rows), "ok": statuses.count("ok"), "failed": len(rows) - statuses.count("ok"),
            "fresh": len(fresh)}


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


def check_ranges(config: ShardedJob, markers: list[dict], total_rows: int, shards_total: int) -> None:
    """Every shard committed once, holding exactly its manifest rows: ranges, not only counts."""
    by_shard = {m["shard"]: m for m in markers}
    missing, wrong = [], []
    for shard in range(shards_total):
        first = shard * config.shard_size
        last = min(first + config.shard_size, total_rows) - 1
        marker = by_shard.get(shard)
        if marker is None:
            missing.append(shard)
        elif (marker.get("first_row"), marker.get("last_row"), marker["rows"]) != (first, last, last - first + 1):
            wrong.append(shard)
    wrong += sorted(shard for shard in by_shard if shard >= shards_total)
    if wrong:
        raise CaptioningError(config.output, f"shard(s) {', '.join(map(str, wrong[:5]))} hold other rows than the "
                              "manifest now gives them; pass a new --output to start over")
    if missing:
        raise CaptioningError(config.output, f"{shards_total - len(missing)}/{shards_total} shards committed; rerun "
                              "the same command to finish")


def read_output(output: str, storage: Storage | None = None) -> Iterator[dict]:
    """Every committed output row, shard by shard (what users and tests read back)."""
    storage = storage or Storage()
    for marker in storage.list(uri(output, "_committed")):
        name = marker.rsplit("/", 1)[-1].removesuffix(".json")
        yield from pq.read_table(io.BytesIO(storage.read_bytes(uri(output, "captions", f"{name}.parquet")))).to_pylist()


def attention_for(row: dict, output: str, storage: Storage | None = None) -> np.ndarray | None:
    """The (words, 7, 7) attention maps of one output row."""
    if not row.get("attention_file"):
        return None
    maps = np.load(io.BytesIO((storage or Storage()).read_bytes(uri(output, row["attention_file"]))),
                   allow_pickle=False)
    return maps[row["attention_offset"] : row["attention_offset"] + row["attention_length"]]
