"""Kill `captioning features` mid-run and rerun it: every manifest row exactly once, as features or a failure.

Not in the "ray" group: the job runs its own local Ray in a subprocess, like the demo test, so it can run
beside the group's shared Ray instance.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.featureset import FeatureSet
from tests.conftest import LoopbackServer, Reply
from tests.test_batch_kill import committed, descendants, kill_job, start_and_wait_for_commits

ROWS, SHARD = 24, 3


@pytest.fixture
def slow_urls(synthetic_data, tmp_path):
    """ROWS loopback image URLs answered after 0.3 s (slow enough to kill the job mid-run), one of them a 404."""
    server = LoopbackServer()
    images = sorted((synthetic_data["test"].parent / "images" / "test").glob("*.jpg"))
    lines = []
    for i in range(ROWS):
        if i != 5:
            server.routes[f"/{i}.jpg"] = Reply(200, images[i % len(images)].read_bytes(), delay=0.3)
        lines.append(f"r{i},{server.url(f'/{i}.jpg')},caption {i}\n")
    (tmp_path / "m.csv").write_text("id,image,caption\n" + "".join(lines))
    yield str(tmp_path / "m.csv")
    server.close()


def test_a_killed_features_job_reruns_to_every_row_exactly_once(slow_urls, tmp_path):
    out = tmp_path / "features"
    command = [sys.executable, "-m", "cli", "features", "--manifest", slow_urls, "--out", str(out),
               "--weights", "none", "--id-column", "id", "--shard-size", str(SHARD), "--batch-size", "4",
               "--fetch-threads", "2", "--allow-network", "127.0.0.1/32", "--no-progress"]
    job = start_and_wait_for_commits(command, out, 2)
    assert any("EmbedShard" in cmd for cmd in descendants(job.pid).values())
    kill_job(job)
    before = len(committed(out))
    assert 2 <= before < ROWS // SHARD and not (out / "_SUCCESS.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{ROWS // SHARD - before} to process" in second.stderr, second.stderr[:600]
    features = FeatureSet(str(out))
    records = [r for shard in features.shards for r in features.records(shard.name)]
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(ROWS))  # every row, each once
    failed = list(features.failures())
    assert [(r["id"], r["status"]) for r in failed] == [("r5", "http_404")]  # recorded, not dropped
    assert features.images == ROWS - 1 and features.pairs == ROWS - 1
    assert json.loads((out / "_SUCCESS.json").read_text())["rows"] == ROWS
    assert Path(out / "backbone.weights.h5").exists()
