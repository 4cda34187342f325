"""Sharded training on Ray Train with features and checkpoints in SeaweedFS: a worker killed mid-run, a rerun
that resumes, and the same validation loss as one process."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from captioning.featureset import FeatureSet
from captioning.storage import Storage
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray

EPOCHS = 4
# Two workers see other shuffles than one process (and one replays a restored epoch): the best validation
# losses of the same data and budget agree within this fraction.
VAL_LOSS_TOLERANCE = 0.15


def kill_a_worker_after_a_registered_checkpoint(storage: Storage, prefix: str, killed: list[int]) -> threading.Thread:
    """SIGKILL one Ray Train worker process (in a thread beside fit()) once Ray Train has registered a
    checkpoint: its controller writes checkpoint_manager_snapshot.json with the latest one then. (Uploaded is not
    enough: a kill before registration restarts from scratch.)"""

    def registered() -> bool:
        snapshots = [k for k in storage.list(prefix) if k.endswith("checkpoint_manager_snapshot.json")]
        return any(json.loads(storage.read_bytes(k)).get("latest_checkpoint_result") for k in snapshots)

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if registered():
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
    from captioning.config import Scaling
    from jobs.train import run

    storage = Storage()
    remote = {}
    for split, local in feature_sets.items():
        storage.upload_dir(local, f"s3://outputs/features-{split}")
        remote[split] = f"s3://outputs/features-{split}"
    assert FeatureSet(remote["train"], storage).pairs == FeatureSet(feature_sets["train"]).pairs
    # A checkpoint every 10 of the 120 steps: the kill after the first registered one lands with most of the run
    # ahead, however fast this machine trains, and the run resumes mid-epoch.
    config = tiny_config(epochs=EPOCHS, batch_size=32, patience=EPOCHS, checkpoint_every=10)
    out = "s3://outputs/ray-model"
    killed: list[int] = []
    watcher = kill_a_worker_after_a_registered_checkpoint(storage, "s3://outputs/ray-model/checkpoints/", killed)
    logs: list[str] = []
    result = run(remote["train"], remote["val"], out, config, Scaling(workers=2, max_failures=2), log=logs.append,
                 progress=False)
    watcher.join(timeout=1)
    assert killed, "no Ray Train worker was found to kill"
    assert result["restores"] >= 1, "\n".join(logs)  # the run went on from a reported checkpoint, not from scratch
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
