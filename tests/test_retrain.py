"""Evaluation-gated retraining: the promotion rule with injected scores, "nothing new" without TensorFlow, and
end to end on SeaweedFS: first version, nothing new, a better one promoted, a corrupted one not, rollback;
a second retrain at once is refused, and a pointer moved meanwhile is not overwritten."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.registry import Registry
from captioning.storage import Storage
from jobs.retrain import RetrainConfig, decide, find_new, retrain
from tests.conftest import TINY_MODEL, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_promotion_rule_with_injected_scores():
    assert decide(None, {"bleu4": 0.0, "cider": 0.0}, 0.02) == (True, "first version of this registry")
    current = {"bleu4": 0.50, "cider": 2.00}
    assert decide(current, {"bleu4": 0.50, "cider": 2.00}, 0.02)[0]
    assert decide(current, {"bleu4": 0.491, "cider": 1.961}, 0.02)[0]  # within 2% on both
    promote, reason = decide(current, {"bleu4": 0.60, "cider": 1.90}, 0.02)  # better BLEU cannot hide worse CIDEr
    assert not promote and "cider" in reason and "bleu4" not in reason
    assert not decide(current, {"bleu4": 0.489, "cider": 2.5}, 0.02)[0]
    assert decide(current, {"bleu4": 0.40, "cider": 1.70}, 0.25)[0]


def synthetic_split(root: Path, name: str, count: int, seed: int, shuffle: bool = False) -> list[dict]:
    """A synthetic split's rows with absolute image paths; shuffle: captions moved to other images."""
    from captioning.datasets import synthetic

    manifest = synthetic.generate(root / name, {"train": count}, seed=seed, progress=False)["train"]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows = [{"image": str(manifest.parent / row["image"]), "caption": row["caption"]} for row in rows]
    if shuffle:
        captions = [row["caption"] for row in rows]
        random.Random(seed).shuffle(captions)
        rows = [{**row, "caption": caption} for row, caption in zip(rows, captions)]
    return rows


def put_manifest(storage: Storage, uri: str, rows: list[dict]) -> str:
    """A manifest on S3 whose images are on S3 beside it (the data of a team's prefix)."""
    images = uri.rsplit("/", 2)[0] + "/images/" + uri.rsplit("/", 1)[1].split(".")[0]
    moved = []
    for row in rows:
        target = f"{images}/{Path(row['image']).name}"
        storage.upload_file(row["image"], target)
        moved.append({**row, "image": target})
    storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in moved).encode())
    return uri


def local_manifest(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_nothing_new_takes_no_training_and_no_tensorflow(tmp_path):
    registry = tmp_path / "registry"
    data = tmp_path / "data"
    data.mkdir()
    script = ("import sys; from jobs.retrain import main; "
              f"code = main(['--registry', {str(registry)!r}, '--data-prefix', {str(data)!r}, "
              "'--holdout', 'h.jsonl', '--val', 'v.jsonl']); "
              "assert code == 0 and 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensor' in m)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing new under" in done.stderr


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three training manifests (two clean of one distribution, one with captions shuffled across images), a
    fixed validation and a fixed holdout manifest."""
    root = tmp_path_factory.mktemp("retrain-data")
    return {"m1": synthetic_split(root, "m1", 96, 11), "m2": synthetic_split(root, "m2", 96, 12),
            "bad": synthetic_split(root, "bad", 96, 13, shuffle=True),
            "val": local_manifest(root / "val.jsonl", synthetic_split(root, "val", 24, 14)),
            "holdout": local_manifest(root / "holdout.jsonl", synthetic_split(root, "holdout", 24, 15))}


def config_for(prefix: str, scenes: dict, tolerance: float = 0.1) -> RetrainConfig:
    train = tiny_config(epochs=3, patience=3, batch_size=32, learning_rate=3e-3, sample_every_epoch=False)
    return RetrainConfig(registry=f"{prefix}/registry", data_prefix=f"{prefix}/data/", holdout=scenes["holdout"],
                         val=scenes["val"], train=train, tolerance=tolerance)


def test_retrain_end_to_end_on_seaweedfs(seaweed, scenes, monkeypatch):
    from jobs.retrain import holdout_scores

    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    storage = Storage()
    prefix = "s3://outputs/retrain-e2e"
    config = config_for(prefix, scenes)
    logs: list[str] = []
    # Everything is real (listing, features, warm-started training, registry writes, the pointer) but the
    # holdout scores that drive the decision: a tiny CPU model's holdout BLEU moves by more than half between
    # two retrains on clean data, so the decision is scripted; the real scorer runs too and must agree in kind.
    scripted = {"v0001": {"bleu4": 0.30, "cider": 1.00}, "v0002": {"bleu4": 0.32, "cider": 1.05},
                "v0003": {"bleu4": 0.10, "cider": 0.40}}
    measured: dict[str, dict] = {}

    def score(bundle, holdout, spec, train, storage, log):
        version = bundle.rstrip("/").split("/")[-2]
        if version not in measured:  # a version's real scores do not change: once each
            measured[version] = holdout_scores(bundle, holdout, spec, train, storage, log)
        return {**measured[version], "scores": {**measured[version]["scores"], **scripted[version]}}

    def run() -> dict:
        return retrain(config, log=logs.append, progress=False, score=score)

    put_manifest(storage, f"{prefix}/data/m1.jsonl", scenes["m1"])
    first = run()
    assert first["action"] == "promoted" and first["version"] == "v0001"
    registry = Registry(config.registry, storage)
    assert registry.current()[0]["version"] == "v0001"

    assert run() == {"action": "nothing"}  # nothing new: no version, no training
    assert registry.versions() == ["v0001"]

    put_manifest(storage, f"{prefix}/data/m2.jsonl", scenes["m2"])
    second = run()
    assert second["version"] == "v0002" and second["action"] == "promoted", second
    info = registry.info("v0002")
    assert info["parent"] == "v0001" and [m["uri"] for m in info["manifests"]] == [f"{prefix}/data/m2.jsonl"]
    assert info["settings"]["train"]["warm_start"].endswith("versions/v0001/model")

    put_manifest(storage, f"{prefix}/data/m3-shuffled.jsonl", scenes["bad"])
    third = run()
    assert third["version"] == "v0003" and third["action"] == "rejected", third
    assert all(m["scores"]["images"] == 24 and 0 <= m["scores"]["bleu4"] <= 1 and len(m["images"]) == 24
               for m in measured.values())  # real holdout runs, every image scored
    assert any("warm start from" in line and "vocabulary" in line for line in logs)
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("epoch ")]
    assert max(losses) < 10  # honest losses on data with words the parent's vocabulary lacks
    assert registry.current()[0]["version"] == "v0002"
    assert registry.info("v0003")["decision"].startswith("not promoted: holdout score dropped")
    assert [e["event"] for e in registry.history()] == ["promote", "promote", "rejected"]

    registry.rollback("v0002 reviewed: worse on real traffic")
    assert registry.current()[0]["version"] == "v0001"
    assert registry.history()[-1]["event"] == "rollback"
    assert find_new(registry, config.data_prefix, storage) == []


def test_a_second_retrain_is_refused_and_a_pointer_moved_meanwhile_is_not_overwritten(seaweed, scenes, tmp_path,
                                                                                       monkeypatch):
    storage = Storage(client=seaweed.client())
    prefix = "s3://outputs/retrain-race"
    put_manifest(storage, f"{prefix}/data/m1.jsonl", scenes["m1"])
    argv = ["--registry", f"{prefix}/registry", "--data-prefix", f"{prefix}/data/", "--holdout", scenes["holdout"],
            "--val", scenes["val"], "--weights", "none", "--epochs", "1", "--batch-size", "32",
            "--d-model", str(TINY_MODEL.d_model), "--layers", "1", "--heads", "2", "--max-length", "20",
            "--no-progress"]
    env = {**__import__("os").environ, **seaweed.env()}
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.retrain", *argv], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    # One retraining per registry at a time: the second is refused at once, naming the first (its lease).
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert refused[-1].startswith(f"error: {prefix}/registry/_lease.json: another retraining run is writing this "
                                  "output: host "), refused
    registry = Registry(f"{prefix}/registry", storage)
    assert registry.versions() == ["v0001"] and registry.current()[0]["version"] == "v0001"

    # Someone promotes by hand while a retraining trains: the run's conditional move fails, it does not overwrite.
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    put_manifest(storage, f"{prefix}/data/m2.jsonl", scenes["m2"])

    def score(bundle, holdout, spec, train, storage_, log):
        if bundle.rstrip("/").split("/")[-2] == "v0002":  # the candidate, trained: now the manual promote lands
            Registry(f"{prefix}/registry", Storage()).promote("v0001", "by hand, meanwhile")
        return {"scores": {"bleu4": 0.5, "cider": 1.0}, "images": ["a", "b"], "rows": 2}

    decided = retrain(config_for(prefix, scenes), log=lambda _: None, progress=False, score=score)
    assert decided["action"] == "rejected" and "while this run trained" in decided["reason"]
    assert registry.current()[0]["version"] == "v0001"
