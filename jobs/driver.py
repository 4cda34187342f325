"""The Ray Data driver of every sharded job: shard inputs -> fetch/decode tasks -> the plug-in's model stage on an
actor pool -> writer tasks (data, then the commit marker), with progress, the memory budget and the outage error.
The frame around it (lease, plan, summary) is the engine's (captioning/shards/run.py)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from captioning import console
from captioning.errors import CaptioningError
from captioning.lease import leased
from captioning.shards.fetching import fetch_shard
from captioning.shards.payloads import Committed, FetchedShard, ShardInput
from captioning.shards.config import ShardedJob
from captioning.shards.plugin import Plugin
from captioning.shards.run import Planned, begin, finish
from captioning.shards.writer import Writer
from captioning.storage import Storage
from captioning.shards.metrics import count_statuses
from jobs.hosts import JobLedger, RayLink
from jobs.metrics import RayMetrics
from jobs.ray_setup import CONNECT_TIMEOUT, TASK_CPUS, connect, outage_error


def fetch_shard_task(row: dict[str, Any], config: ShardedJob, writer: Writer, ledger: list[Any],
                     job: str) -> dict[str, Any]:
    """Ray task: the engine's fetch stage on one shard, polite through the job's host ledger."""
    return fetch_shard(ShardInput.from_row(row), config, writer, RayLink(ledger) if ledger else None,
                       RayMetrics(job)).to_row()


class ModelStage:
    """Ray actor: the plug-in's model stage, built once per actor, on fetched shards."""

    def __init__(self, plugin: Plugin, config: ShardedJob) -> None:
        self.stage = plugin.stage(config)
        self.metrics = RayMetrics(plugin.kind)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        fetched = FetchedShard.from_row(row)
        began = time.perf_counter()
        out = self.stage(fetched).to_row()
        busy = time.perf_counter() - began
        self.metrics.count("captioning_actor_busy_seconds", busy)
        if len(fetched.images):
            self.metrics.observe("captioning_inference_seconds", busy / len(fetched.images))
        return out


def actor_class(plugin: Plugin) -> type:
    """ModelStage under the plug-in's stage name (CaptionShard, EmbedShard): the name Ray Data gives the operator,
    its actors' process titles and the dashboard, so that people (and the kill tests) can tell which is which."""
    name = plugin.stage_name
    return type(name, (ModelStage,), {"__module__": __name__, "__qualname__": name})


def write_shard_task(row: dict[str, Any], writer: Writer, processed: type, job: str) -> dict[str, Any]:
    """Ray task: the plug-in's writer on one processed shard; its rows counted by status."""
    shard = processed.from_row(row)
    committed = writer.write(shard)
    count_statuses(RayMetrics(job), (r.status for r in shard.rows))
    return committed.to_row()


def check_cpus(config: ShardedJob, cpus: float, fixed: bool, log: Callable[[str], None]) -> None:
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


def run(plugin: Plugin, config: Any, address: str | None = None, log: Callable[[str], None] = print,
        connect_timeout: float = CONNECT_TIMEOUT, progress: bool = True) -> dict[str, Any]:
    """Every manifest row of config through the plug-in, each shard committed exactly once, under the output's
    lease (a second run refuses at once, naming the first); returns the _SUCCESS summary."""
    storage = Storage(config.storage)
    config = plugin.configure(config, storage, log)
    with leased(storage, config.output, plugin.what, log, config.lease_stale_after):
        planned = begin(plugin, config, storage, log)
        processed = _process(plugin, config, planned, address, log, progress, connect_timeout) if planned.todo else 0
        return finish(plugin, config, storage, planned, processed, log)


def _process(plugin: Plugin, config: Any, planned: Planned, address: str | None, log: Callable[[str], None],
             progress: bool, connect_timeout: float) -> int:
    """Run the shards to do on Ray Data; returns the rows this run handled."""
    import ray  # noqa: PLC0415

    joined = connect(address, timeout=connect_timeout)
    check_cpus(config, ray.cluster_resources().get("CPU", 0.0), fixed=not joined, log=log)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar of our own, with rows and rows/s
    context.raise_original_map_exception = True  # our StorageError, not Ray's UserCodeException around it
    # Fetching is faster than the model stage: without a cap, decoded images pile up in the object store and
    # memory grows with the manifest. A few shards per actor keep the actors fed and memory flat.
    shard_bytes = config.shard_size * config.image.size**2 * 3
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=shard_bytes * plugin.buffered(config) * config.actors)
    writer = plugin.writer(config)
    tasks = min(config.fetch_tasks * config.actors, len(planned.todo))
    with JobLedger(config.politeness, tasks, log) as ledger:
        return _run_stages(plugin, config, planned, writer, tasks, ledger.handles, progress)


def _run_stages(plugin: Plugin, config: Any, planned: Planned, writer: Writer, tasks: int, ledger: list[Any],
                progress: bool) -> int:
    """The pipeline on Ray Data, consumed here with progress; the rows this run handled."""
    import ray  # noqa: PLC0415

    items = ray.data.from_items([ShardInput(shard).to_row() for shard in planned.todo],
                                override_num_blocks=len(planned.todo))
    fetched = items.map(fetch_shard_task, fn_kwargs={"config": config, "writer": writer, "ledger": ledger,
                                                     "job": plugin.kind}, num_cpus=TASK_CPUS,
                        # No more tasks than shards: Ray Data warns of a concurrency it can never reach.
                        compute=ray.data.TaskPoolStrategy(size=tasks))
    processed = fetched.map(actor_class(plugin), fn_constructor_kwargs={"plugin": plugin, "config": config},
                            num_cpus=config.actor_cpus, num_gpus=config.num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=config.actors))
    written = processed.map(write_shard_task, fn_kwargs={"writer": writer, "processed": plugin.payload,
                                                          "job": plugin.kind}, num_cpus=TASK_CPUS)
    counts: Counter = Counter()
    bar = console.progress(plugin.total(config, planned.todo, planned.layout), plugin.label, plugin.unit,
                           progress)
    try:
        for row in written.iter_rows():
            committed = Committed.from_row(row)
            counts.update({"rows": committed.fresh, "ok": committed.ok, "failed": committed.failed, "shards": 1})
            bar.update(plugin.progress(committed))
            rate = counts["rows"] / max(time.time() - planned.started, 1e-9)
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], rows_per_s=f"{rate:.1f}")
    except Exception as err:  # noqa: BLE001  (Ray wraps a task's error; outage_error unwraps ours)
        raise outage_error(err, planned.shards_total - len(planned.todo) + counts["shards"],
                           planned.shards_total) from None
    bar.close()
    return counts["rows"]
