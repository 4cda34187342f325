"""Per-stage timings of the bulk job, and which stage bounds it.

Every shard records, in its commit marker, the wall-clock span of each pipeline stage it went through
(fetch, caption, write) and the seconds spent in each kind of work (fetch, decode, backbone, decoder, write).
Fetch seconds are per-request latencies summed: many requests are in flight at once, so they overlap.
`stage_report` turns the markers of one run into the figures people ask for: seconds and milliseconds per
image per stage, start-up time, steady throughput, and the bounding stage.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

WORK = ("fetch", "decode", "backbone", "decoder", "write")
CPU_WORK = ("fetch_cpu", "decode_cpu")  # the fetch threads' own CPU clocks: what fetching and decoding cost
# The caption actors are the expensive, scarce stage: when they are busy nearly all the time, they bound
# the job; when they sit idle, images are not arriving fast enough (or results are not leaving).
BUSY_ENOUGH = 0.85


@dataclass
class StageRecord:
    """One stage's pass over one shard: its wall span (epoch seconds) and seconds per kind of work."""

    stage: str
    start: float
    end: float
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # what the stage counted: bytes, throttling events, ...


class StageClock:
    """Accumulates seconds per kind of work and the wall span of the stage, for one shard."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.span = [time.time(), time.time()]

    @contextmanager
    def measure(self, work: str) -> Iterator[None]:
        """Add the time spent inside the block to `work`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(work, time.perf_counter() - began)

    def add(self, work: str, seconds: float) -> None:
        """Add seconds measured elsewhere (per-row times summed by the caller)."""
        self.seconds[work] = self.seconds.get(work, 0.0) + seconds

    def count(self, what: str, value: int) -> None:
        """Add to a count of the stage's (bytes fetched, hosts' throttling answers, ...)."""
        if value:
            self.counts[what] = self.counts.get(what, 0) + int(value)

    def finish(self, stage: str) -> StageRecord:
        """The stage's record: wall span from the clock's start to now, seconds per kind of work, counts."""
        self.span[1] = time.time()
        return StageRecord(stage, self.span[0], self.span[1], dict(self.seconds), dict(self.counts))


def merge(records: Iterable[StageRecord]) -> dict:
    """Combine one shard's stage records into the marker's timing: spans by stage, summed seconds by work."""
    timing: dict = {"spans": {}, "seconds": {}, "counts": {}}
    for record in records:
        timing["spans"][record.stage] = [record.start, record.end]
        for work, seconds in record.seconds.items():
            timing["seconds"][work] = timing["seconds"].get(work, 0.0) + seconds
        for what, value in record.counts.items():
            timing["counts"][what] = timing["counts"].get(what, 0) + value
    return timing


def stage_report(timings: list[dict], images: int, actors: int, started: float) -> dict:
    """Seconds and ms/image per kind of work, start-up, steady rate, caption-actor busy share, bounding stage."""
    if not timings:
        return {}
    seconds = {work: sum(t["seconds"].get(work, 0.0) for t in timings) for work in WORK + CPU_WORK}
    captions = [t["spans"]["caption"] for t in timings]
    first, last = min(s for s, _ in captions), max(e for _, e in captions)
    inits = [t["spans"]["actor_init"] for t in timings if "actor_init" in t["spans"]]
    firsts = [t["spans"]["first_batch"][1] for t in timings if "first_batch" in t["spans"]]
    busy = sum(e - s for s, e in captions) / max(actors * (last - first), 1e-9)
    if images == 0:
        bound, why = "nothing captioned", "every row failed before reaching the caption actors"
    elif busy >= BUSY_ENOUGH:
        bound = max(("backbone", "decoder"), key=seconds.get)
        why = f"caption actors busy {busy:.0%} of the time; {bound} is the larger share of their work"
    elif seconds["write"] > seconds["backbone"] + seconds["decoder"]:
        bound, why = "write", f"caption actors busy {busy:.0%}; writing takes longer than inference"
    else:
        bound = "fetch/decode"
        why = f"caption actors busy only {busy:.0%}: waiting for fetched and decoded images"
    return {
        "seconds": {work: round(value, 3) for work, value in seconds.items()},
        "ms_per_image": {work: round(1000 * value / max(images, 1), 3) for work, value in seconds.items()},
        "startup_seconds": round(first - started, 3),
        # Of which: Ray and Ray Data starting the pipeline, then the first actor loading the model and tracing.
        "startup_before_actors_seconds": round(min(s for s, _ in inits) - started, 3) if inits else None,
        "actor_init_seconds": round(min(e - s for s, e in inits), 3) if inits else None,
        "first_row_seconds": round(min(firsts) - started, 3) if firsts else None,
        "first_row_at": min(firsts) if firsts else None,  # epoch seconds: a caller can time from its own start
        "steady_images_per_second": round(images / max(last - first, 1e-9), 2),
        "caption_busy": round(busy, 3),
        "bound_by": bound,
        "why": why,
    }
