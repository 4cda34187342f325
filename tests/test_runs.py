"""A rerun into an --out that holds a run: the same settings resume, other settings are refused, --restart
starts over; locally, on S3, and for Ray Train runs."""

import json
from pathlib import Path

import pytest

from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec
from captioning.runs import RUN_FILE, claim_run, differences, run_settings
from captioning.storage import Storage
from cli.main import main
from tests.conftest import tiny_config


def quiet(_):
    pass


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# The command-line form of tests.conftest.tiny_config, so the CLI reruns exactly what train() ran.
TINY_ARGS = ["--weights", "none", "--epochs", "2", "--batch-size", "32", "--learning-rate", "0.003",
             "--patience", "3", "--seed", "1", "--backbone-seed", "1", "--max-length", "20", "--d-model", "32",
             "--layers", "1", "--heads", "2", "--dropout", "0", "--steps-per-epoch", "2"]


def test_a_rerun_with_other_settings_is_one_error_naming_each_change_and_leaves_every_file_as_it_was(
        feature_sets, tmp_path, capsys):
    out = tmp_path / "model"
    common = ["train", "--train", feature_sets["train"], "--val", feature_sets["val"], "--out", str(out),
              "--no-progress"]
    assert main([*common, *TINY_ARGS]) == 0
    capsys.readouterr()
    before = files(out)
    assert RUN_FILE in before and "bundle.json" in before

    changed = [*TINY_ARGS]
    changed[changed.index("--d-model") + 1] = "64"
    changed[changed.index("--learning-rate") + 1] = "0.01"
    assert main([*common, *changed]) == 2
    printed, err = capsys.readouterr()
    assert printed == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {out}: holds a run with other settings: ")
    assert "--d-model 32 -> 64" in err and "--learning-rate 0.003 -> 0.01" in err and "--restart" in err
    assert "--epochs" not in err and "--train" not in err
    assert files(out) == before  # byte for byte, nothing added or removed


def test_the_same_settings_resume_a_larger_epochs_continues_and_restart_starts_over(feature_sets, tmp_path):
    from captioning.train import train

    out, logs = tmp_path / "model", []
    config = tiny_config(epochs=1, steps_per_epoch=2, sample_every_epoch=False)
    first = train(feature_sets["train"], feature_sets["val"], out, config, progress=False, log=quiet)
    more = train(feature_sets["train"], feature_sets["val"], out, tiny_config(epochs=2, steps_per_epoch=2,
                 sample_every_epoch=False), progress=False, log=logs.append)
    assert any("resuming from the checkpoint after epoch 1" in line for line in logs)
    assert more.history[0] == first.history[0] and len(more.history) == 2
    assert json.loads((out / RUN_FILE).read_text())["settings"]["--epochs"] == 2

    logs.clear()
    other = tiny_config(epochs=1, steps_per_epoch=2, learning_rate=1e-3, sample_every_epoch=False)
    with pytest.raises(CaptioningError, match=r"--learning-rate 0.003 -> 0.001; --epochs 2 -> 1"):
        train(feature_sets["train"], feature_sets["val"], out, other, progress=False, log=logs.append)
    fresh = train(feature_sets["train"], feature_sets["val"], out, other, progress=False, log=logs.append,
                  restart=True)
    assert any(line.startswith("--restart: discarding the run") for line in logs)
    assert not any("resuming" in line for line in logs) and len(fresh.history) == 1
    assert json.loads((out / RUN_FILE).read_text())["settings"]["--learning-rate"] == 1e-3


def test_a_run_that_stopped_early_trains_nothing_more_when_rerun(feature_sets, tmp_path, monkeypatch):
    from captioning.train import train
    from captioning.training.loop import Trainer

    real = Trainer.run_epoch
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])

    def scripted(self, data, train_, steps, desc, progress, **kw):
        metrics = real(self, data, train_, steps, desc, progress, **kw)
        return metrics if train_ else {**metrics, "loss": next(losses)}

    monkeypatch.setattr(Trainer, "run_epoch", scripted)
    config = tiny_config(epochs=5, patience=1, steps_per_epoch=1, sample_every_epoch=False)
    done = train(feature_sets["train"], feature_sets["val"], tmp_path, config, progress=False, log=quiet)
    assert done.stopped_early and len(done.history) == 2
    logs = []
    again = train(feature_sets["train"], feature_sets["val"], tmp_path, config, progress=False, log=logs.append)
    assert len(again.history) == 2 and again.best_epoch == 1
    assert any("stopped early after epoch 2: nothing left to train" in line for line in logs)


def test_data_is_compared_by_content_and_only_a_smaller_epochs_counts_as_a_change(tmp_path):
    storage = Storage()
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\na.jpg,a cat\n")
    settings = run_settings(str(manifest), str(manifest), tiny_config(), ManifestSpec(), 0, storage)
    moved = tmp_path / "elsewhere.csv"
    moved.write_bytes(manifest.read_bytes())
    same = run_settings(str(moved), str(manifest), tiny_config(epochs=9), ManifestSpec(), 0, storage)
    assert differences(settings, same) == []
    manifest.write_text("image,caption\na.jpg,a dog\n")
    edited = run_settings(str(manifest), str(manifest), tiny_config(epochs=1), ManifestSpec(), 2, storage)
    changes = differences(settings, edited)
    assert [c.split(" ")[0] for c in changes] == ["--train", "--val", "--workers", "--epochs"]
    assert changes[-1] == "--epochs 2 -> 1"


def test_a_ray_train_run_in_object_storage_refuses_other_settings_before_touching_the_cluster(
        seaweed, feature_sets, monkeypatch):
    from jobs import train as train_job

    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    storage = Storage()
    out = "s3://outputs/ray-run"
    recorded = run_settings(feature_sets["train"], feature_sets["val"], tiny_config(), ManifestSpec(), 2, storage)
    claim_run(out, recorded, storage, False, lambda: None, quiet)
    storage.write_bytes(f"{out}/checkpoints/checkpoint_000000/state.json", b"{}")
    before = {uri: storage.read_bytes(uri) for uri in storage.list(out + "/")}
    monkeypatch.setattr(train_job, "connect", lambda *a, **k: pytest.fail("the cluster was reached"))
    from captioning.config import Scaling

    config = tiny_config()
    with pytest.raises(CaptioningError, match=r"--workers 2 -> 1"):
        train_job.run(feature_sets["train"], feature_sets["val"], out, config, Scaling(workers=1))
    assert {uri: storage.read_bytes(uri) for uri in storage.list(out + "/")} == before

    discarded = []
    monkeypatch.setattr(train_job, "connect", lambda *a, **k: discarded.append(storage.list(out + "/")) or
                        (_ for _ in ()).throw(CaptioningError("cluster", "stop here")))
    with pytest.raises(CaptioningError, match="stop here"):
        train_job.run(feature_sets["train"], feature_sets["val"], out, config, Scaling(workers=1), restart=True)
    # The old run's checkpoints went, its new settings came; the lease is this run's, held while it runs.
    assert discarded == [[f"{out}/_lease.json", f"{out}/{RUN_FILE}"]]
    assert not storage.exists(f"{out}/_lease.json")  # released when the run stopped
