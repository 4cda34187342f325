"""Sharded training on Ray Train with features and checkpoints in SeaweedFS; a worker killed mid-run; a rerun
resumes; and the features job killed mid-run finishes every row exactly once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from captioning.featureset import FeatureSet
from captioning.storage import Storage
from tests.conftest import LoopbackServer, Reply, tiny_config
from tests.test_batch_kill import committed, descendants, start_and_wait_for_commits

pytestmark = pytest.mark.ray

EPOCHS = 4
# Two workers see other shuffles than one process (and one replays a restored epoch): the best validation
# losses of the same data and budget agree within this fraction.
VAL_LOSS_TOLERANCE = 0.15


def kill_a_worker_after_two_checkpoints(storage: Storage, prefix: str, killed: list[int]) -> threading.Thread:
    """SIGKILL one Ray Train worker process (in a thread beside fit()) once two checkpoints are in storage:
    by then the first one is surely registered with Ray Train, not only uploaded."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if sum("/checkpoint_" in key and key.endswith("state.json") for key in storage.list(prefix)) >= 2:
                break
            time.sleep(0.2)
        for process in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                os.kill(process.info["pid"], signal.SIGKILL)
                killed.append(process.info["pid"])
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_two_workers_survive_a_killed_worker_resume_a_rerun_and_match_one_process(
        ray_session, feature_sets, tmp_path):
    from captioning.bundle import load_bundle
    from captioning.generate import Generator
    from captioning.train import train
    from jobs.train import Scaling, run

    storage = Storage()
    remote = {}
    for split, local in feature_sets.items():
        storage.upload_dir(local, f"s3://outputs/features-{split}")
        remote[split] = f"s3://outputs/features-{split}"
    assert FeatureSet(remote["train"], storage).pairs == FeatureSet(feature_sets["train"]).pairs
    config = tiny_config(epochs=EPOCHS, batch_size=32, patience=EPOCHS)
    out = "s3://outputs/ray-model"
    killed: list[int] = []
    watcher = kill_a_worker_after_two_checkpoints(storage, "s3://outputs/ray-model/checkpoints/", killed)
    logs: list[str] = []
    result = run(remote["train"], remote["val"], out, config, Scaling(workers=2, max_failures=2), log=logs.append,
                 progress=False)
    watcher.join(timeout=1)
    assert killed, "no Ray Train worker was found to kill"
    assert result["restores"] >= 1  # the run went on from a reported checkpoint, not from scratch
    assert [row["epoch"] for row in result["history"]] == list(range(1, EPOCHS + 1))

    # The bundle loads from s3:// and captions images.
    bundle = load_bundle(out, storage=storage)
    record, features = FeatureSet(remote["val"], storage).first_image()
    assert Generator(bundle.model)(features[None].astype("float32")).captions[0].strip()
    assert storage.exists(f"{out}/training_curves.png")

    # The same data and budget in one process reaches the same validation loss, within the stated margin.
    single = train(feature_sets["train"], feature_sets["val"], tmp_path / "single", config, progress=False,
                   log=lambda _: None)
    single_best = min(row["val_loss"] for row in single.history)
    ray_best = min(row["val_loss"] for row in result["history"])
    assert abs(ray_best - single_best) <= VAL_LOSS_TOLERANCE * single_best, (ray_best, single_best)

    # Started again with the same --out and one more epoch, the run resumes: epochs 1..4 are not redone.
    again = run(remote["train"], remote["val"], out, tiny_config(epochs=EPOCHS + 1, batch_size=32, patience=EPOCHS),
                Scaling(workers=2), log=lambda _: None, progress=False)
    assert again["history"][:EPOCHS] == result["history"]
    assert len(again["history"]) == EPOCHS + 1 and again["restores"] > result["restores"]


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
    command = [sys.executable, "-m", "captioning.cli", "features", "--manifest", slow_urls, "--out", str(out),
               "--weights", "none", "--id-column", "id", "--shard-size", str(SHARD), "--batch-size", "4",
               "--fetch-threads", "2", "--allow-network", "127.0.0.1/32", "--no-progress"]
    job = start_and_wait_for_commits(command, out, 2)
    below = descendants(job.pid)
    assert any("EmbedShard" in cmd for cmd in below.values())
    for pid in below:  # Ray's processes, in case one left the job's process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    before = len(committed(out))
    assert 2 <= before < ROWS // SHARD and not (out / "_SUCCESS.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{ROWS // SHARD - before} to process" in second.stdout, second.stdout[:600]
    features = FeatureSet(str(out))
    records = [r for shard in features.shards for r in features.records(shard.name)]
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(ROWS))  # every row, each once
    failed = list(features.failures())
    assert [(r["id"], r["status"]) for r in failed] == [("r5", "http_404")]  # recorded, not dropped
    assert features.images == ROWS - 1 and features.pairs == ROWS - 1
    assert json.loads((out / "_SUCCESS.json").read_text())["rows"] == ROWS
    assert Path(out / "backbone.weights.h5").exists()
