"""Stage timings: what each shard records, and how a run's records become a report naming the bound."""

import subprocess
import sys

import pytest

from captioning.shards.timings import CPU_WORK, WORK, StageClock, StageRecord, merge, stage_report


def shard(start: float, fetch: float, caption: float, write: float, seconds: dict) -> dict:
    """The merged timing record of one shard whose stages ran back to back from `start`."""
    spans = {"fetch": [start, start + fetch], "caption": [start + fetch, start + fetch + caption],
             "write": [start + fetch + caption, start + fetch + caption + write], "actor_init": [1.0, 4.0],
             "first_batch": [start + fetch, start + fetch + caption / 4]}
    return {"spans": spans, "seconds": seconds}


def test_clock_accumulates_work_and_spans():
    clock = StageClock()
    with clock.measure("backbone"):
        sum(range(10000))
    clock.add("backbone", 0.5)
    clock.add("decoder", 0.25)
    record = clock.finish("caption")
    assert 0.5 < record.seconds["backbone"] < 1.0 and record.seconds["decoder"] == 0.25
    assert record.start <= record.end
    timing = merge([StageRecord("fetch", 0, 1, {"fetch": 2.0}), record])
    assert timing["spans"] == {"fetch": [0, 1], "caption": [record.start, record.end]}
    assert timing["seconds"]["fetch"] == 2.0 and timing["seconds"]["decoder"] == 0.25


def test_busy_actors_mean_inference_bounds_the_job():
    # Four shards captioned back to back (no gaps) by one actor; backbone dominates.
    timings = [shard(4.0 + i, 0.0, 1.0, 0.0, {"fetch": 3, "decode": 0.2, "backbone": 0.8, "decoder": 0.15,
                                              "write": 0.01}) for i in range(4)]
    report = stage_report(timings, images=400, actors=1, started=0.0)
    assert report["bound_by"] == "backbone" and report["caption_busy"] == pytest.approx(1.0)
    assert report["startup_seconds"] == pytest.approx(4.0)
    assert report["startup_before_actors_seconds"] == pytest.approx(1.0)
    assert report["actor_init_seconds"] == pytest.approx(3.0)
    assert report["first_row_seconds"] == pytest.approx(4.25)  # the first shard's first batch, a quarter in
    assert report["steady_images_per_second"] == pytest.approx(100.0)
    assert report["ms_per_image"]["backbone"] == pytest.approx(8.0) and set(report["ms_per_image"]) == set(WORK + CPU_WORK)


def test_idle_actors_mean_fetching_bounds_the_job():
    # Each caption takes 0.2 s but shards arrive a second apart: the actor waits for images.
    timings = [shard(i * 1.0, 0.8, 0.2, 0.0, {"fetch": 20, "decode": 0.5, "backbone": 0.15, "decoder": 0.05,
                                              "write": 0.01}) for i in range(5)]
    report = stage_report(timings, images=500, actors=1, started=0.0)
    assert report["bound_by"] == "fetch/decode" and report["caption_busy"] < 0.5


def test_slow_writes_are_named():
    timings = [shard(i * 1.0, 0.0, 0.3, 0.7, {"fetch": 1, "decode": 0.1, "backbone": 0.2, "decoder": 0.05,
                                             "write": 0.7}) for i in range(5)]
    assert stage_report(timings, images=500, actors=1, started=0.0)["bound_by"] == "write"


def test_nothing_processed_gives_an_empty_report():
    assert stage_report([], images=0, actors=1, started=0.0) == {}


def test_shards_whose_rows_all_failed_name_no_stage_as_the_bound():
    seconds = {work: 0.0 for work in WORK} | {"fetch": 3.0, "write": 0.1}
    report = stage_report([shard(10.0, 3.0, 0.01, 0.1, seconds)], images=0, actors=1, started=9.0)
    assert report["bound_by"] == "nothing captioned" and "every row failed" in report["why"]


def test_pipeline_stages_other_than_the_actors_do_not_import_tensorflow():
    # Fetch and write tasks import captioning.bulk: TensorFlow there would cost seconds and ~0.5 GB a worker.
    code = "import sys, captioning.bulk, jobs.batch; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
