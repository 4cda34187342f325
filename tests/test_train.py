import json

import numpy as np
import pytest

from captioning.errors import CaptioningError
from captioning.manifest import read_manifest
from captioning.train import masked_loss, train
from tests.conftest import tiny_config


def quiet(_):
    pass


def test_training_writes_history_curves_and_restores_best(synthetic_data, trained_bundle):
    history = json.loads((trained_bundle / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert (trained_bundle / "history.csv").read_text().startswith("epoch,loss,accuracy,val_loss,val_accuracy")
    assert (trained_bundle / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((trained_bundle / "bundle.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert meta["metrics"]["best_epoch"] == best["epoch"]


def test_early_stopping_restores_the_best_epoch(synthetic_data, tmp_path):
    # A learning rate this high makes validation loss rise after the first epoch.
    logs = []
    result = train(read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path,
                   tiny_config(epochs=6, patience=1, learning_rate=0.3), progress=False, log=logs.append)
    history = result.history
    assert result.stopped_early and len(history) < 6
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    assert result.best_epoch == best + 1
    assert any("early stopping" in line for line in logs) and sum("sample for" in line for line in logs) == len(history)
    from captioning.bundle import load_bundle  # the saved weights are the best epoch's, not the last
    import h5py

    with h5py.File(tmp_path / "decoder.weights.h5") as saved, h5py.File(tmp_path / "checkpoint/best.weights.h5") as kept:
        def leaves(group):
            out = []
            group.visititems(lambda name, obj: out.append(obj[()]) if hasattr(obj, "shape") else None)
            return out
        for a, b in zip(leaves(saved), leaves(kept)):
            np.testing.assert_array_equal(a, b)
    load_bundle(tmp_path)


def test_resume_continues_from_the_last_checkpoint(synthetic_data, tmp_path):
    args = (read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path)
    first = train(*args, tiny_config(epochs=1), progress=False, log=quiet)
    logs = []
    second = train(*args, tiny_config(epochs=3), progress=False, log=logs.append)
    assert any("resuming" in line and "after epoch 1" in line for line in logs)
    assert [r["epoch"] for r in second.history] == [1, 2, 3]
    assert second.history[0] == first.history[0]  # epoch 1 was not rerun


def test_bad_images_are_reported_and_training_goes_on(synthetic_data, tmp_path):
    good = synthetic_data["train"].read_text().splitlines()[:60]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines = good + [json.dumps({"image": str(tmp_path / "broken.jpg"), "caption": ["x"]}),
                    json.dumps({"image": str(tmp_path / "absent.jpg"), "caption": ["y"]}), "{oops"]
    manifest_path = tmp_path / "train.jsonl"
    manifest_path.write_text("\n".join(lines).replace('"images/', f'"{synthetic_data["train"].parent}/images/') + "\n")
    logs = []
    result = train(read_manifest(manifest_path), read_manifest(synthetic_data["val"]), tmp_path / "m",
                   tiny_config(epochs=1), progress=False, log=logs.append)
    skipped = [line for line in logs if line.startswith("skipped")]
    assert len(skipped) == 3
    assert any("broken.jpg: not an image" in s for s in skipped) and any("absent.jpg" in s for s in skipped)
    assert any("train.jsonl:63" in s for s in skipped)
    assert json.loads((tmp_path / "m/bundle.json").read_text())["metrics"]["train_images"] == 60
    assert result.best_epoch == 1


def test_no_usable_images_is_an_error(synthetic_data, tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\nnope.jpg,x\n")
    with pytest.raises(CaptioningError, match="m.csv: no usable training examples"):
        train(read_manifest(tmp_path / "m.csv"), read_manifest(synthetic_data["val"]), tmp_path / "o",
              tiny_config(), progress=False, log=quiet)


def test_masked_loss_ignores_padding_and_takes_float_labels():
    import tensorflow as tf

    logits = tf.math.log(tf.constant([[[0.1, 0.9, 0.0001], [0.5, 0.25, 0.25]]]))
    loss, count, correct = masked_loss(tf.constant([[1.0, 0.0]]), logits)  # second label is padding
    assert float(count) == 1 and float(correct) == 1
    np.testing.assert_allclose(float(loss), -np.log(0.9 / 1.0001), rtol=1e-4)
