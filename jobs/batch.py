"""Bulk captioning on Ray Data: manifest -> plan shards -> fetch/decode tasks -> caption actors -> write + commit."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Callable


from captioning import console
from captioning.bulk import BulkConfig, CaptionShard, check_ranges, fetch_shard, plan_shards, uri, write_shard
from captioning.errors import CaptioningError
from captioning.featureset import FeaturesConfig
from captioning.lease import Lease
from captioning.options import batch_options, bulk_config, guarded, job_parser, log, show_progress
from captioning.stage_timings import stage_report
from captioning.storage import Storage
from jobs.ray_setup import CONNECT_TIMEOUT, TASK_CPUS, connect, outage_error



def run(config: BulkConfig, address: str | None = None, log: Callable[[str], None] = print,
        connect_timeout: float = CONNECT_TIMEOUT,
        progress: bool = True) -> dict:
    """Caption every manifest row into config.output exactly once; returns the _SUCCESS summary."""
    storage = Storage(config.storage)
    config = config.resolved(storage).with_absolute_paths()
    if config.model_ref.startswith("registry+"):
        log(f"model {config.model_ref}")
    # One run per output at a time: a second one refuses at once, naming the first.
    with Lease(storage, uri(config.output, "_lease.json"), stale_after=config.lease_stale_after, log=log,
               what="captioning batch run"):
        return _run(config, storage, address, log, progress, connect_timeout)


def _run(config: BulkConfig, storage: Storage, address: str | None, log: Callable[[str], None],
         progress: bool, connect_timeout: float) -> dict:
    import ray  # noqa: PLC0415

    started = time.time()
    todo, total_rows = plan_shards(config, storage)
    shards_total = -(-total_rows // config.shard_size)
    log(f"{total_rows} rows in {shards_total} shards; {len(todo)} to process"
        + (" (retrying transient failures)" if config.retry_failed else ""))
    fresh = Counter()
    if todo:
        joined = connect(address, timeout=connect_timeout)
        check_cpus(config, ray.cluster_resources().get("CPU", 0.0), fixed=not joined, log=log)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # one bar of our own, with rows and images/s
        context.raise_original_map_exception = True  # our StorageError, not Ray's UserCodeException around it
        # Fetching is faster than captioning: without a cap, decoded images pile up in the object store and
        # memory grows with the manifest. A few shards per actor keep the actors fed and memory flat.
        shard_bytes = config.shard_size * config.image.size**2 * 3
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=shard_bytes * config.buffered_shards * config.actors)
        items = ray.data.from_items([{"shard": shard} for shard in todo], override_num_blocks=len(todo))
        fetched = items.map(fetch_shard, fn_kwargs={"config": config}, num_cpus=TASK_CPUS)
        captioned = fetched.map(CaptionShard, fn_constructor_kwargs={"config": config}, num_cpus=config.actor_cpus,
                                num_gpus=config.num_gpus or None,
                                compute=ray.data.ActorPoolStrategy(size=config.actors))
        written = captioned.map(write_shard, fn_kwargs={"config": config}, num_cpus=TASK_CPUS)
        # Every shard is full but the last; a rerun's shards (or retried rows) may be fewer.
        rows_todo = sum(min(config.shard_size, total_rows - shard * config.shard_size) for shard in todo)
        bar = console.progress(rows_todo, "captioning", "rows", progress)
        try:
            for summary in written.iter_rows():
                fresh.update({"rows": summary["fresh"], "ok": summary["ok"], "failed": summary["failed"], "shards": 1})
                bar.update(summary["fresh"])
                rate = fresh["rows"] / max(time.time() - started, 1e-9)
                bar.set_postfix(ok=fresh["ok"], failed=fresh["failed"], rows_per_s=f"{rate:.1f}")
        except Exception as err:  # noqa: BLE001  (Ray wraps a task's error; outage_error unwraps ours)
            raise outage_error(err, shards_total - len(todo) + fresh["shards"], shards_total) from None
        bar.close()
    summary = summarise(config, storage, total_rows, shards_total, fresh["rows"], started)
    log(f"{summary['rows']} rows: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items())
        + f"; {summary['rows_per_second']:.1f} rows/s this run; output {config.output}")
    if summary["stages"]:
        stages = summary["stages"]
        log("ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in stages["ms_per_image"].items())
            + f"; start-up {stages['startup_seconds']:.1f} s; bound by {stages['bound_by']} ({stages['why']})")
    return summary


def check_cpus(config: BulkConfig | FeaturesConfig, cpus: float, fixed: bool, log: Callable[[str], None]) -> None:
    """Refuse (local Ray) or warn (a cluster may scale up) when the actors would leave no CPU for the tasks."""
    needed = config.actors * config.actor_cpus + 2 * TASK_CPUS  # at least one fetch and one write task
    if needed <= cpus:
        return
    message = (f"{config.actors} actor(s) x {config.actor_cpus} CPU leave no room for the fetch and write tasks "
               f"({2 * TASK_CPUS} CPU) on {cpus:g} CPUs, so the job would wait forever; use fewer --actors or a "
               "smaller --actor-cpus")
    if fixed:
        raise CaptioningError("--actors/--actor-cpus", message)
    log(f"warning: {message} (unless the cluster scales up)")


def summarise(config: BulkConfig, storage: Storage, total_rows: int, shards_total: int, processed: int,
              started_at: float) -> dict:
    """Check every shard is committed with exactly its rows, then write _SUCCESS.json with this run's timings."""
    markers = [json.loads(storage.read_bytes(m)) for m in storage.list(uri(config.output, "_committed"))]
    check_ranges(config, markers, total_rows, shards_total)
    rows = sum(m["rows"] for m in markers)
    statuses = Counter(status for m in markers for status in m["statuses"])
    seconds = time.time() - started_at
    this_run = [m for m in markers if m["committed"] >= started_at and "timing" in m]
    stages = stage_report([m["timing"] for m in this_run], sum(m["images"] for m in this_run), config.actors,
                          started_at)
    summary = {"rows": rows, "shards": shards_total, "statuses": dict(statuses.most_common()),
               "rows_processed_this_run": processed, "wall_seconds": seconds,
               "rows_per_second": processed / seconds if seconds else 0.0, "stages": stages,
               "model_versions": sorted({m["model_version"] for m in markers}), "manifest": config.manifest,
               "model": config.model, "model_ref": config.model_ref,
               "models": sorted({m.get("model") or "" for m in markers} - {""}), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(uri(config.output, "_SUCCESS.json"), json.dumps(summary, indent=2).encode())
    return summary


def command(args: argparse.Namespace) -> int:
    """`captioning batch` and `python -m jobs.batch`: one run from the parsed options."""
    run(bulk_config(args), address=args.address, log=log, connect_timeout=args.connect_timeout,
        progress=show_progress(args))
    return 0  # every row is committed; failed rows are output rows with their status, not a failed job


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted batch job: the local command's options, one `error:` line on failure."""
    args = job_parser("python -m jobs.batch", __doc__, batch_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
