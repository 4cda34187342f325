"""Backbone features on Ray Data: manifest -> plan shards -> fetch/decode tasks -> backbone actors -> write + commit.

The stages are captioning/featureset.py's; `captioning train` runs the same ones in-process.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any, Callable


from captioning import console
from captioning.bulk import fetch_shard, plan_shards, uri
from captioning.errors import CaptioningError
from captioning.featureset import EmbedShard, FeaturesConfig, prepare_backbone, summarise, write_feature_shard
from captioning.lease import Lease
from captioning.options import features_config, features_options, guarded, job_parser, log, show_progress
from captioning.storage import Storage
from jobs.batch import check_cpus
from jobs.ray_setup import CONNECT_TIMEOUT, TASK_CPUS, connect, outage_error

BUFFERED_SHARDS = 4  # decoded shards waiting per backbone actor: bounds the object store


def run(config: FeaturesConfig, address: str | None = None, log: Callable[[str], None] = print,
        connect_timeout: float = CONNECT_TIMEOUT,
        progress: bool = True, backbone: Any = None) -> dict:
    """Features for every manifest row, each shard committed exactly once; returns the _SUCCESS summary.
    backbone: an already-built one to use (default: the configured one)."""
    config = config.with_absolute_paths()
    storage = Storage(config.storage)
    with Lease(storage, uri(config.output, "_lease.json"), stale_after=config.lease_stale_after, log=log,
               what="features run"):
        return _run(config, storage, address, log, progress, backbone, connect_timeout)


def _run(config: FeaturesConfig, storage: Storage, address: str | None, log: Callable[[str], None],
         progress: bool, backbone: Any, connect_timeout: float) -> dict:
    import ray  # noqa: PLC0415

    started = time.time()
    # Once, on the driver, and before the plan: every actor loads these very weights, and a failed download
    # leaves no plan that would pin this output to them.
    info = prepare_backbone(config, storage, backbone)
    todo, total_rows = plan_shards(config, storage)
    if not total_rows:
        raise CaptioningError(config.manifest, "has no rows")
    shards_total = -(-total_rows // config.shard_size)
    log(f"{total_rows} rows in {shards_total} shards; {len(todo)} to process with {info['name']} "
        f"({info['weights_source']})")
    counts: Counter = Counter()
    if todo:
        joined = connect(address, timeout=connect_timeout)
        check_cpus(config, ray.cluster_resources().get("CPU", 0.0), fixed=not joined, log=log)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.raise_original_map_exception = True  # our StorageError, not Ray's UserCodeException around it
        shard_bytes = config.shard_size * config.image.size**2 * 3
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=shard_bytes * BUFFERED_SHARDS * config.actors)
        items = ray.data.from_items([{"shard": shard} for shard in todo], override_num_blocks=len(todo))
        fetched = items.map(fetch_shard, fn_kwargs={"config": config}, num_cpus=TASK_CPUS)
        embedded = fetched.map(EmbedShard, fn_constructor_kwargs={"config": config}, num_cpus=config.actor_cpus,
                               num_gpus=config.num_gpus or None, compute=ray.data.ActorPoolStrategy(size=config.actors))
        written = embedded.map(write_feature_shard, fn_kwargs={"config": config}, num_cpus=TASK_CPUS)
        bar = console.progress(len(todo), "features", "shards", progress)
        try:
            for summary in written.iter_rows():
                counts.update({"rows": summary["rows"], "ok": summary["ok"], "failed": summary["failed"], "shards": 1})
                bar.update(1)
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"],
                                rows_per_s=f"{counts['rows'] / max(time.time() - started, 1e-9):.1f}")
        except Exception as err:  # noqa: BLE001  (Ray wraps a task's error; outage_error unwraps ours)
            raise outage_error(err, shards_total - len(todo) + counts["shards"], shards_total) from None
        bar.close()
    summary = summarise(config, storage, total_rows, started)
    log(f"{summary['rows']} rows: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())
        + f"; {summary['images']} images, {summary['pairs']} caption pairs; output {config.output}")
    return summary


def command(args: argparse.Namespace) -> int:
    """`captioning features` and `python -m jobs.features`: one run from the parsed options."""
    run(features_config(args), address=args.address, log=log, connect_timeout=args.connect_timeout,
        progress=show_progress(args))
    return 0  # every row is committed; failed rows are recorded with their status, not a failed job


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted features job: the local command's options, one `error:` line on failure."""
    args = job_parser("python -m jobs.features", __doc__, features_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
