"""Sharded training on Ray Train with features and checkpoints in SeaweedFS: a worker killed mid-run, a rerun
that resumes, and the same validation loss as one process."""

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
    from captioning.config import Scaling
    from jobs.train import run

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
