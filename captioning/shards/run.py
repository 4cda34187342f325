"""A sharded run's frame, shared by the in-process runner below and the Ray Data driver (jobs/driver.py):
configure, lease, prepare, plan, (process every shard to do), summarise, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from captioning import console
from captioning.errors import CaptioningError
from captioning.output_source import check_source
from captioning.hosts.gate import LocalLink
from captioning.shards.fetching import fetch_shard
from captioning.shards.payloads import ShardInput
from captioning.shards.plan import Layout, plan_shards
from captioning.shards.plugin import Log, Plugin
from captioning.shards.summary import summarise
from captioning.storage import Storage


@dataclass
class Planned:
    """What planning found: the shards to process, and which rows every shard holds."""

    todo: list[int]
    layout: Layout
    started: float

    @property
    def total_rows(self) -> int:
        """Rows of the manifest (every generation)."""
        return self.layout.rows

    @property
    def shards_total(self) -> int:
        """Shards of the output (every generation)."""
        return self.layout.shards


def begin(plugin: Plugin, config: Any, storage: Storage, log: Log) -> Planned:
    """Under the run's lease: the plug-in's preparation, then the plan, and one line saying what is to do."""
    started = time.time()
    check_source(config.manifest, storage)  # a bulk output as the manifest: usable, before the backbone's download
    words = plugin.prepare(config, storage)  # before the plan: a failure here pins the output to nothing
    seen = plugin.seen(config, storage)
    if seen:
        words += f" ({len(seen)} URLs seen in earlier outputs are skipped)"
    todo, layout = plan_shards(config, storage, plugin.dedupe_urls, seen)
    if plugin.needs_rows and not layout.rows:
        raise CaptioningError(config.manifest, "has no rows")
    grew = layout.generations[-1] if layout.continued else None
    log(f"{layout.rows} rows in {layout.shards} shards; {len(todo)} to process{words}"
        + (f" (the manifest grew: rows {grew.first_row}+ are new, from shard {grew.first_shard})" if grew else ""))
    return Planned(todo, layout, started)


def finish(plugin: Plugin, config: Any, storage: Storage, planned: Planned, processed_rows: int,
           log: Log) -> dict[str, Any]:
    """Check every shard committed, write _SUCCESS.json, report."""
    summary = summarise(config, storage, planned.layout, planned.started,
                        lambda markers, seconds: plugin.extra(config, markers, seconds, processed_rows,
                                                              planned.started))
    plugin.report(summary, config, log)
    return summary


def run_here(plugin: Plugin, config: Any, log: Log = print, progress: bool = True,
             stage: Any = None) -> dict[str, Any]:
    """A sharded job in this process, one shard at a time, with the same stages and layout as on Ray Data.
    stage: an already-built model stage to use."""
    from captioning.lease import leased  # noqa: PLC0415

    storage = Storage(config.storage)
    config = plugin.configure(config, storage, log)
    with leased(storage, config.output, plugin.what, log, config.lease_stale_after):
        planned = begin(plugin, config, storage, log)
        processed = 0
        if planned.todo:
            stage = stage or plugin.stage(config)
            writer = plugin.writer(config)
            bar = console.progress(plugin.total(config, planned.todo, planned.layout), plugin.label,
                                   plugin.unit, progress, leave=False)
            link = LocalLink(config.politeness) if config.politeness.active else None
            for shard in planned.todo:
                committed = writer.write(stage(fetch_shard(ShardInput(shard), config, writer, link)))
                processed += committed.fresh
                bar.update(plugin.progress(committed))
            bar.close()
        return finish(plugin, config, storage, planned, processed, log)
