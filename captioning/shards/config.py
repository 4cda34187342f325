"""What every sharded job's config holds, and what the engine reads of one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from captioning.config import BULK_IMAGE, FetchConfig, ImageConfig, PolitenessConfig, StorageConfig, option
from captioning.lease import STALE_AFTER
from captioning.manifest import ManifestSpec
from captioning.shards import defaults

MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ShardedConfig:
    """The fields the bulk and features configs share: shards, the model stage's actor pool, what a fetch task may
    read and decode. Each is also its command-line option (jobs/options.py builds them from the metadata)."""

    shard_size: int = option("--shard-size", default=defaults.SHARD_SIZE, kind="positive", group="data",
                             help="rows per committed shard")
    actors: int = option("--actors", default=defaults.ACTORS, kind="positive", group="Ray",
                         help="actors of the model stage (captioning or backbone), each loading its model once")
    actor_cpus: float = option("--actor-cpus", default=defaults.ACTOR_CPUS, kind="non_negative", group="Ray",
                               help="CPUs Ray reserves per actor (fetch and write tasks need some left)")
    num_gpus: float = option("--num-gpus", default=defaults.NUM_GPUS, kind="non_negative", group="Ray",
                             help="GPUs per actor")
    fetch_threads: int = option("--fetch-threads", default=defaults.FETCH_THREADS, kind="positive", group="fetching",
                                help="concurrent requests per fetch task")
    fetch_tasks: int = option("--fetch-tasks", default=defaults.FETCH_TASKS_PER_ACTOR, kind="positive",
                              group="fetching", help="fetch tasks at once per model-stage actor (each holds up to "
                              "a shard of decoded images; a GPU actor may want more)")
    allow_local_files: bool = option("--allow-local-files", default=False, kind="flag", group="fetching",
                                     help="also read rows that are local paths or file:// URIs (off: a URL job reads "
                                     "no local file; a features manifest reads files beside it anyway)")
    allow_s3_sources: bool = option("--allow-s3-sources", default=False, kind="flag", group="fetching",
                                    help="also read s3:// rows, with this job's credentials (a features manifest on "
                                    "S3 reads keys beside it anyway)")
    decode_memory: int = option("--decode-memory", default=defaults.DECODE_MEMORY, kind="positive", unit=MIB,
                                metavar="MIB", group="fetching",
                                help="decoded-image memory one fetch task may hold at once, MiB")
    retry_failed: bool = False
    lease_stale_after: float = STALE_AFTER  # seconds without a heartbeat before another run may take the output
    fetch: FetchConfig = field(default_factory=FetchConfig)
    politeness: PolitenessConfig = field(default_factory=PolitenessConfig)
    image: ImageConfig = field(default_factory=lambda: BULK_IMAGE)
    storage: StorageConfig = field(default_factory=StorageConfig)


class ShardedJob(Protocol):
    """What the engine reads of a job's config: a ShardedConfig with a manifest, an output and its own plan fields."""

    manifest: str
    output: str
    spec: ManifestSpec
    shard_size: int
    retry_failed: bool
    fetch_threads: int
    fetch_tasks: int
    allow_local_files: bool
    allow_s3_sources: bool
    decode_memory: int
    actors: int
    actor_cpus: float
    num_gpus: float
    lease_stale_after: float
    fetch: FetchConfig
    politeness: PolitenessConfig
    image: ImageConfig
    storage: StorageConfig

    def plan_extra(self) -> dict[str, Any]:
        """Job-specific plan fields: a rerun that changes any of them is refused."""
