"""The bulk captioning job's config: its own fields and options beside the ones every sharded job has. Light to
import (no NumPy, no Arrow): the command line builds its options from it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from captioning.config import GenerationConfig, option
from captioning.manifest import ManifestSpec
from captioning.shards.config import ShardedConfig
from captioning.storage import Storage, absolute


OUTPUT_FORMATS = ("parquet", "webdataset")


@dataclass(frozen=True)
class BulkConfig(ShardedConfig):
    """Everything one bulk run needs; built by the CLI, shipped to every stage."""

    manifest: str = option("--manifest", group="data",
                           help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    model: str = option("--model", group="data", help="model bundle directory or s3:// prefix, or "
                        "registry+URI[@vNNNN]: the registry's current version (resolved once, kept in every row)")
    output: str = option("--output", group="data", help="output directory or s3:// prefix")
    spec: ManifestSpec = field(default_factory=lambda: ManifestSpec(image_column="url"))
    batch_size: int | None = None  # None: the fastest size for the device (captioning/devices.py)
    inference_threads: int | None = option("--inference-threads", default=None, kind="positive", group="Ray",
                                           help="TensorFlow threads per captioning actor (default: the CPUs it "
                                           "reserves, --actor-cpus rounded up; all CPUs of its node if none)")
    buffered_shards: int = 8  # decoded shards held in Ray's object store per captioning actor: bounds memory
    attention: bool = option("--no-attention", default=True, kind="flag", negated=True, group="data",
                             help="skip attention maps")
    attention_png: int = option("--attention-png", default=0, kind="int", metavar="N", group="data",
                                help="also write overlay PNGs for the first N manifest rows")
    retry_failed: bool = option("--retry-failed", default=False, kind="flag", group="data", kw_only=True,
                                help="redo only rows with transient failures")
    output_format: str = option("--output-format", default="parquet", choices=OUTPUT_FORMATS, group="data",
                                help="parquet: captions/shard-N.parquet and attention arrays; webdataset: "
                                "shards/shard-N.tar with each row's image, caption, JSON row and attention")
    keep_original: bool = option("--keep-original", default=False, kind="flag", group="data",
                                 help="webdataset: keep each image's bytes as fetched, not the model's view (JPEG)")
    skip_seen: tuple[str, ...] = option("--skip-seen", default=(), kind="append", metavar="OUTPUT", group="data",
                                        help="skip URLs an earlier bulk output captioned ok (status seen, seen_in "
                                        "names it); repeatable")
    precision: str = "auto"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model_ref: str = ""  # the --model as resolved once (registry+URI@vNNNN), kept in every row; "": model itself

    def with_absolute_paths(self) -> "BulkConfig":
        """The same run with local manifest/model/output paths made absolute, as Ray workers need."""
        return replace(self, manifest=absolute(self.manifest), model=absolute(self.model), output=absolute(self.output),
                       model_ref=self.model_ref or absolute(self.model),
                       skip_seen=tuple(absolute(earlier) for earlier in self.skip_seen))

    def resolved(self, storage: Storage) -> "BulkConfig":
        """The same run with a registry --model resolved, once, to one version's bundle."""
        from captioning.registry import resolve_model  # noqa: PLC0415

        found = resolve_model(self.model, storage)
        return replace(self, model=found.bundle, model_ref=found.ref)

    def plan_extra(self) -> dict[str, Any]:
        """The output format, when not Parquet: one output never mixes two (outputs planned before the option
        existed are Parquet and keep their plan)."""
        return {"output_format": self.output_format} if self.output_format != "parquet" else {}
