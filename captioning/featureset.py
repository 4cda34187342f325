"""Feature sets: a manifest's backbone features in committed shards, and the stream training reads them as.

The features plug-in of the sharded-job engine (captioning/shards/): written by `captioning features` on Ray Data
(jobs/driver.py) or in-process by `captioning train` (the engine's run_here); both give the same layout under the
output URI (local or s3://):
  _plan.json, _lease.json, _input/shard-NNNNN.jsonl   as in every sharded job (captioning/shards/layout.py)
  backbone.json                 name, weights source, fingerprint and channels of the backbone
  backbone.weights.h5           its exact weights: every actor, and the trained bundle, use these
  features/shard-NNNNN.npy      float16 (images, 49, C): the shard's loaded images, in row order
  features/shard-NNNNN.json     one record per manifest row: row, id, image (the cell verbatim), captions,
                                status, error, and offset into the .npy (null when the image failed)
  _committed/shard-NNNNN.json   commit marker, written last: rows, images and caption pairs of the shard
  _SUCCESS.json                 summary of the run
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from captioning.errors import CaptioningError
from captioning.featureset_config import FeaturesConfig
from captioning.shards.layout import COMMITTED, SUCCESS, marker_uri, shard_name, uri
from captioning.shards.payloads import Committed, FetchedShard, ShardRows, array_to_bytes
from captioning.shards.plan import read_marker
from captioning.shards.plugin import Log, Plugin
from captioning.shards.timings import StageClock, StageRecord, merge
from captioning.shards.writer import commit_marker
from captioning.storage import Storage, is_s3, local_path

BACKBONE_INFO = "backbone.json"
BACKBONE_WEIGHTS = "backbone.weights.h5"


def prepare_backbone(config: FeaturesConfig, storage: Storage, backbone: Any = None) -> dict[str, Any]:
    """backbone.json and backbone.weights.h5 in the output, written once; a rerun reuses them."""
    from captioning.features import Backbone  # noqa: PLC0415  (TensorFlow: only where features are made)

    info_uri = uri(config.output, BACKBONE_INFO)
    if storage.exists(info_uri):
        info = json.loads(storage.read_bytes(info_uri))
        seed = config.seed if config.weights == "none" else None
        if (info["name"], info["weights_source"], info.get("seed")) != (config.backbone, config.weights, seed):
            made = info["weights_source"] + (f", backbone seed {info.get('seed')}" if info.get("seed") is not None
                                             else "")
            raise CaptioningError(config.output, f"holds features of {info['name']} ({made}); use a new --output "
                                  "for another backbone")
        return info
    backbone = backbone or Backbone(config.backbone, config.weights, seed=config.seed, image_size=config.image.size)
    info = {**backbone.describe(), "weights_source": config.weights}
    with tempfile.TemporaryDirectory() as tmp:
        backbone.save(Path(tmp) / BACKBONE_WEIGHTS)
        storage.upload_file(Path(tmp) / BACKBONE_WEIGHTS, uri(config.output, BACKBONE_WEIGHTS))
    # The info file goes last: with it, the weights beside it are complete.
    storage.write_bytes(info_uri, json.dumps(info, indent=2).encode())
    return info


def load_backbone(location: str, storage: Storage) -> Any:
    """The backbone a feature set was made with, from its own weights file."""
    from captioning.features import Backbone  # noqa: PLC0415

    info = json.loads(storage.read_bytes(uri(location, BACKBONE_INFO)))
    weights = uri(location, BACKBONE_WEIGHTS)
    return Backbone.from_record(info, storage.local_file(weights), weights)


@dataclass
class Embedded(ShardRows):
    """A shard after the backbone: float16 (ok rows, 49, C) features in row order."""

    features: np.ndarray


class EmbedShard:
    """Actor-side stage: loads the feature set's backbone once, then turns each shard's images into features."""

    def __init__(self, config: FeaturesConfig, backbone: Any = None) -> None:
        self.started = time.time()  # before importing TensorFlow: its import is part of the actor's start-up
        from captioning.devices import use_cpu_threads  # noqa: PLC0415

        if backbone is None:
            use_cpu_threads(None, config.actor_cpus)
        self.config = config
        self.backbone = backbone or load_backbone(config.output, Storage(config.storage))
        self.ready = time.time()

    def __call__(self, shard: FetchedShard) -> Embedded:
        clock = StageClock()
        images = shard.images
        feats = []
        with clock.measure("backbone"):
            for start in range(0, len(images), self.config.batch_size):
                feats.append(self.backbone(images[start : start + self.config.batch_size]).numpy().astype(np.float16))
        array = np.concatenate(feats) if feats else np.zeros((0, 49, self.backbone.channels), np.float16)
        return Embedded(**shard.passed_on(clock.finish("embed"), StageRecord("actor_init", self.started, self.ready)),
                        features=array)


class FeatureWriter:
    """The feature-shard writer: features/shard-N.npy and features/shard-N.json, then the commit marker."""

    images = ""  # the features are the output: no image bytes travel to the writer

    def __init__(self, config: FeaturesConfig) -> None:
        self.config = config

    def previous(self, shard: int) -> tuple[int, None] | None:
        """A committed shard is redone whole (its .npy holds only loaded images): the next attempt, no rows."""
        storage = Storage(self.config.storage)
        if not storage.exists(marker_uri(self.config.output, shard)):
            return None
        return read_marker(self.config.output, shard, storage).get("attempt", 0) + 1, None

    def write(self, processed: Embedded) -> Committed:
        """Write a shard's features and records, then its commit marker; returns the shard's counts."""
        config, clock = self.config, StageClock()
        storage = Storage(config.storage)
        name = shard_name(processed.shard)
        records, offset = [], 0
        for row in processed.rows:
            records.append({"row": row.row, "id": row.id, "image": row.url, "captions": row.captions,
                            "status": row.status, "error": row.error, "offset": offset if row.ok else None})
            offset += row.ok
        with clock.measure("write"):
            # Data first, marker last: a crash in between leaves a shard that the next run simply redoes.
            storage.write_bytes(uri(config.output, "features", f"{name}.npy"), array_to_bytes(processed.features),
                                "application/octet-stream")
            storage.write_bytes(uri(config.output, "features", f"{name}.json"), json.dumps(records).encode())
        statuses = [r["status"] for r in records]
        pairs = sum(len(r["captions"]) for r in records if r["offset"] is not None)
        marker = {"shard": processed.shard, "rows": len(records), "images": offset, "pairs": pairs,
                  "statuses": statuses, "first_row": processed.first_row, "last_row": processed.last_row,
                  "attempt": processed.attempt, "committed": time.time(),
                  "timing": merge([*processed.timing, clock.finish("write")])}
        commit_marker(storage, marker_uri(config.output, processed.shard), marker, processed.attempt)
        return Committed(processed.shard, len(records), offset, len(records) - offset, len(records), pairs)


class Features(Plugin):
    """Backbone features of every manifest row into a feature set. backbone: an already-built one to use (default:
    the configured one, built on the driver and loaded by every actor from the feature set's own weights)."""

    what = "features run"
    kind = "features"
    label = "backbone features"
    stage_class = EmbedShard
    payload = Embedded
    writer_class = FeatureWriter
    unit = "shards"
    needs_rows = True

    def __init__(self, backbone: Any = None) -> None:
        self.backbone = backbone

    def prepare(self, config: FeaturesConfig, storage: Storage) -> str:
        """The backbone's weights into the output, before the plan: a failed download pins it to nothing."""
        info = prepare_backbone(config, storage, self.backbone)
        return f" with {info['name']} ({info['weights_source']})"

    def buffered(self, config: FeaturesConfig) -> int:
        """Decoded shards waiting per backbone actor."""
        return 4

    def stage(self, config: FeaturesConfig) -> EmbedShard:
        """The backbone actor's stage, with the given backbone if there is one."""
        return EmbedShard(config, self.backbone)

    def extra(self, config: FeaturesConfig, markers: list[dict], seconds: float, processed_rows: int,
              started: float) -> dict[str, Any]:
        """Images and caption pairs of the feature set."""
        return {"images": sum(m["images"] for m in markers), "pairs": sum(m["pairs"] for m in markers)}

    def report(self, summary: dict[str, Any], config: FeaturesConfig, log: Log) -> None:
        """Rows by status, images and pairs."""
        log(f"{summary['rows']} rows: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())
            + f"; {summary['images']} images, {summary['pairs']} caption pairs; output {config.output}")


def extract_features(config: FeaturesConfig, log: Callable[[str], None] = print, progress: bool = True,
                     backbone: Any = None) -> dict[str, Any]:
    """The features job in this process, with the same stages and layout as the Ray Data job."""
    from captioning.shards.run import run_here  # noqa: PLC0415  (fetching is heavy; reading a feature set is not)

    return run_here(Features(backbone), config, log, progress)


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard of a feature set, as its marker gives it."""

    name: str
    rows: int
    images: int
    pairs: int


class FeatureSet:
    """A committed feature set read back: its backbone, its shards, and each shard's features and records."""

    def __init__(self, location: str, storage: Storage | None = None) -> None:
        self.location = location.rstrip("/")
        self.storage = storage or Storage()
        try:
            self.backbone = json.loads(self.storage.read_bytes(uri(self.location, BACKBONE_INFO)))
        except CaptioningError:
            raise CaptioningError(location, "not a feature set (no backbone.json); make one with "
                                  "`captioning features`") from None
        self.shards = [self._info(marker) for marker in self.storage.list(uri(self.location, COMMITTED))
                       if marker.endswith(".json")]
        if not self.storage.exists(uri(self.location, SUCCESS)):
            raise CaptioningError(location, "feature set is incomplete (no _SUCCESS.json); rerun `captioning "
                                  "features` with the same options to finish it")

    @staticmethod
    def is_feature_set(location: str, storage: Storage) -> bool:
        """Whether location holds a feature set (rather than being a manifest)."""
        try:
            return storage.exists(uri(location, BACKBONE_INFO))
        except CaptioningError:
            return False

    def _info(self, marker: str) -> ShardInfo:
        data = json.loads(self.storage.read_bytes(marker))
        return ShardInfo(marker.rsplit("/", 1)[-1].removesuffix(".json"), data["rows"], data["images"], data["pairs"])

    @property
    def channels(self) -> int:
        """Feature depth C."""
        return int(self.backbone["channels"])

    @property
    def pairs(self) -> int:
        """Caption pairs of loaded images, over all shards."""
        return sum(s.pairs for s in self.shards)

    @property
    def images(self) -> int:
        """Loaded images, over all shards."""
        return sum(s.images for s in self.shards)

    def records(self, name: str) -> list[dict[str, Any]]:
        """The per-row records of one shard."""
        return json.loads(self.storage.read_bytes(uri(self.location, "features", f"{name}.json")))

    def features(self, name: str) -> np.ndarray:
        """float16 (images, 49, C) of one shard: memory-mapped when local, read whole from S3."""
        where = uri(self.location, "features", f"{name}.npy")
        if is_s3(where):
            return np.load(io.BytesIO(self.storage.read_bytes(where)), allow_pickle=False)
        return np.load(local_path(where), mmap_mode="r", allow_pickle=False)

    def captions(self) -> Iterator[str]:
        """Every caption of a loaded image, one shard at a time (the vocabulary's streaming pass)."""
        for shard in self.shards:
            for record in self.records(shard.name):
                if record["offset"] is not None:
                    yield from record["captions"]

    def first_image(self) -> tuple[dict[str, Any], np.ndarray]:
        """The first loaded image's record and features (49, C): the sample caption's image."""
        for shard in self.shards:
            for record in self.records(shard.name):
                if record["offset"] is not None:
                    return record, np.asarray(self.features(shard.name)[record["offset"]])
        raise CaptioningError(self.location, "holds no loaded image")

    def failures(self) -> Iterator[dict[str, Any]]:
        """Records of rows whose image or row failed, with their status and error."""
        for shard in self.shards:
            for record in self.records(shard.name):
                if record["offset"] is None:
                    yield record
