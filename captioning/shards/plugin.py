"""A plug-in says what is particular to one sharded job; the engine (and jobs/driver.py on Ray) does the rest."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

from captioning.shards.payloads import Committed, FetchedShard, Payload
from captioning.shards.config import ShardedJob
from captioning.shards.plan import Layout
from captioning.shards.writer import Writer
from captioning.storage import Storage

Log = Callable[[str], None]


class Plugin:
    """One kind of sharded job: its model stage, its writer, and its words."""

    what: ClassVar[str]  # the run's name in lease and log lines: "captioning batch run"
    kind: ClassVar[str]  # the job's name in metrics: "batch", "features"
    label: ClassVar[str]  # the progress bar's
    stage_class: ClassVar[type]  # the model stage: built once per actor from the config, called per shard
    payload: ClassVar[type[Payload]]  # what the model stage returns
    writer_class: ClassVar[type]  # the output format's Writer, built from the config
    unit: ClassVar[str] = "rows"  # what the progress bar counts: "rows" or "shards"
    needs_rows: ClassVar[bool] = False  # an empty manifest is an error rather than an empty output
    dedupe_urls: ClassVar[bool] = False  # rows repeating an earlier row's URL share its result (duplicate_of)

    def configure(self, config: Any, storage: Storage, log: Log) -> Any:
        """The config as the run uses it (paths absolute, references resolved), before its lease is taken."""
        return config.with_absolute_paths()

    def prepare(self, config: Any, storage: Storage) -> str:
        """Work before the plan, on the driver, under the lease; words for the plan's log line."""
        return ""

    def seen(self, config: Any, storage: Storage) -> Mapping[bytes, str]:
        """URLs (plan.url_key) earlier outputs already hold, each to its output: rows with them are not fetched."""
        return {}

    def buffered(self, config: Any) -> int:
        """Decoded shards held in Ray's object store per actor: bounds memory."""
        return 8

    @property
    def stage_name(self) -> str:
        """The model stage's name in Ray (operator, actor process titles, dashboard)."""
        return self.stage_class.__name__

    def stage(self, config: Any) -> Callable[[FetchedShard], Payload]:
        """The model stage (an actor's work): built once per actor, called per shard."""
        return self.stage_class(config)

    def writer(self, config: Any) -> Writer:
        """The writer of this job's output format."""
        return self.writer_class(config)

    def extra(self, config: Any, markers: list[dict], seconds: float, processed_rows: int,
              started: float) -> dict[str, Any]:
        """Fields of _SUCCESS.json beyond the ones every job has."""
        return {}

    def report(self, summary: dict[str, Any], config: Any, log: Log) -> None:
        """The run's last log lines."""

    def progress(self, committed: Committed) -> int:
        """How far one committed shard moves the progress bar."""
        return committed.fresh if self.unit == "rows" else 1

    def total(self, config: ShardedJob, todo: list[int], layout: Layout) -> int:
        """The progress bar's length."""
        if self.unit == "shards":
            return len(todo)
        ranges = layout.ranges()  # a rerun's shards (or retried rows) may be fewer
        return sum(ranges[shard][1] - ranges[shard][0] + 1 for shard in todo)
