"""The features job's config: which backbone, beside the fields and options every sharded job has. Light to
import (no NumPy, no TensorFlow): the command line builds its options from it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from captioning.config import (BACKBONE_CHANNELS, BACKBONE_SEED_HELP, WEIGHTS_HELP, ModelConfig, TrainConfig,
                               option)
from captioning.manifest import ManifestSpec
from captioning.shards.config import ShardedConfig
from captioning.storage import absolute, is_s3


@dataclass(frozen=True)
class FeaturesConfig(ShardedConfig):
    """One features run: which manifest, which backbone, where to, and the bulk job's fetch and decode rules."""

    manifest: str = option("--manifest", group="data",
                           help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    output: str = option("--out", "--output", group="data", help="output folder or s3:// prefix")
    spec: ManifestSpec = field(default_factory=ManifestSpec)
    backbone: str = option("--backbone", default=ModelConfig.backbone, choices=tuple(BACKBONE_CHANNELS),
                           group="model", help="frozen image backbone")
    weights: str = option("--weights", default=TrainConfig.weights, group="model", help=WEIGHTS_HELP)
    seed: int = option("--backbone-seed", "--seed", default=TrainConfig.backbone_seed, kind="int", group="model",
                       help=BACKBONE_SEED_HELP)
    batch_size: int = option("--batch-size", default=64, kind="positive", group="model",
                             help="images per backbone call")

    def plan_extra(self) -> dict[str, Any]:
        """Features of another backbone never join a feature set: the backbone is part of the plan."""
        return {"kind": "features", "backbone": self.backbone, "weights": self.weights, "seed": self.seed,
                "image_size": self.image.size}

    def with_absolute_paths(self) -> "FeaturesConfig":
        """The same run with local paths made absolute, as Ray workers need."""
        return replace(self, manifest=absolute(self.manifest), output=absolute(self.output))

    @classmethod
    def reading_own_kind(cls, manifest: str, output: str, **options: Any) -> "FeaturesConfig":
        """A config that reads rows of the manifest's own kind (local files beside a local manifest, s3://
        keys beside one on S3) besides http(s) URLs; the other kind still needs its --allow-* flag."""
        local = not is_s3(manifest)
        options["allow_local_files"] = options.get("allow_local_files", False) or local
        options["allow_s3_sources"] = options.get("allow_s3_sources", False) or not local
        return cls(manifest=manifest, output=output, **options)
