"""`captioning status OUTPUT`: a job's progress from its output alone, running or finished."""

from __future__ import annotations

import json
import time

from captioning.bulk import BulkConfig
from captioning.lease import leased
from captioning.manifest import ManifestSpec
from captioning.shards.layout import marker_uri
from captioning.shards.plan import plan_shards
from captioning.shards.status import job_status
from captioning.storage import Storage
from cli.main import main


def planned_output(tmp_path, rows: int = 40) -> BulkConfig:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "url": f"http://h{i}.example/{i}.jpg"}) + "\n"
                                for i in range(rows)))
    config = BulkConfig(str(manifest), "unused", str(tmp_path / "out"), ManifestSpec(image_column="url", id_column="id"),
                        shard_size=10)
    plan_shards(config, Storage())
    return config


def commit(config: BulkConfig, shard: int, statuses: list[str], at: float, counts: dict[str, int]) -> None:
    marker = {"shard": shard, "rows": len(statuses), "statuses": statuses, "committed": at, "attempt": 0,
              "timing": {"spans": {"fetch": [at - 5, at - 1]}, "seconds": {}, "counts": counts}}
    Storage().write_bytes(marker_uri(config.output, shard), json.dumps(marker).encode())


def test_a_running_job_shows_rows_done_its_recent_rate_an_eta_and_the_shards_figures(tmp_path, capsys):
    config = planned_output(tmp_path)
    now = time.time()
    commit(config, 0, ["ok"] * 8 + ["http_404", "robots_disallowed"], now - 20, {"bytes_fetched": 3 * 2**20,
                                                                               "robots_disallowed": 1})
    commit(config, 1, ["ok"] * 9 + ["host_unavailable"], now - 10, {"bytes_fetched": 2**20, "throttled": 2})
    with leased(Storage(), config.output, "captioning batch run", log=lambda _: None):
        status = job_status(config.output, Storage(), now=now)
        assert status["state"] == "running" and status["holder"]["what"] == "captioning batch run"
        assert (status["rows"], status["rows_done"], status["shards"], status["shards_done"]) == (40, 20, 4, 2)
        assert status["statuses"] == {"ok": 17, "http_404": 1, "robots_disallowed": 1, "host_unavailable": 1}
        assert status["transient"] == 1  # host_unavailable: --retry-failed takes it
        # 20 rows from the first shard's start (25 s ago) to now: 0.8 rows/s, 20 more rows in 25 s.
        assert status["rows_per_second"] == 0.8 and status["eta_seconds"] == 25
        assert status["counts"] == {"bytes_fetched": 4 * 2**20, "robots_disallowed": 1, "throttled": 2}
        assert main(["status", config.output]) == 0
    out = capsys.readouterr().out
    assert "running (captioning batch run on" in out and "rows: 20 of 40 (50.0%) in 2 of 4 shards" in out
    assert "rate: 0.8 rows/s; done in about 0m25s" in out and "transient: 1 rows" in out
    assert "4.0 MiB fetched" in out and "throttled 2" in out
    stopped = job_status(config.output, Storage(), now=now)
    assert stopped["state"] == "stopped" and stopped["eta_seconds"] is None


def test_status_of_a_folder_that_is_no_jobs_output_is_one_error_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: not a sharded job's output")
