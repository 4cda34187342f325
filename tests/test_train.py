import json

import numpy as np
import pytest

from captioning.errors import CaptioningError
from captioning.manifest import read_manifest
from captioning.train import train
from captioning.training.loop import Trainer, masked_loss
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


def scripted_validation(monkeypatch, losses):
    """Real training, but validation reports these losses: the control flow under test, not the dynamics."""
    real, script, snapshots = Trainer.run_epoch, iter(losses), []

    def run_epoch(self, data, train, steps, desc, progress, **kw):
        metrics = real(self, data, train, steps, desc, progress, **kw)
        if train:
            return metrics
        snapshots.append([w.copy() for w in self.model.get_weights()])
        return {**metrics, "loss": next(script)}

    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    return snapshots


def test_early_stopping_restores_the_best_epoch(synthetic_data, feature_cache, tmp_path, monkeypatch):
    snapshots = scripted_validation(monkeypatch, [2.0, 1.0, 1.5, 1.25, 0.5, 0.1])
    logs = []
    result = train(read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path,
                   tiny_config(epochs=6, patience=2, steps_per_epoch=2, cache_dir=feature_cache), progress=False,
                   log=logs.append)
    # Epoch 2 is best; epochs 3 and 4 do not improve on it, so patience 2 stops after epoch 4.
    assert result.stopped_early and [r["val_loss"] for r in result.history] == [2.0, 1.0, 1.5, 1.25]
    assert result.best_epoch == 2 and len(snapshots) == 4
    assert any("early stopping" in line for line in logs) and sum("sample for" in line for line in logs) == 4
    assert json.loads((tmp_path / "bundle.json").read_text())["metrics"]["val_loss"] == 1.0
    from captioning.bundle import load_bundle  # the saved weights are epoch 2's, not the last epoch's

    saved = load_bundle(tmp_path).model.get_weights()
    for mine, best, last in zip(saved, snapshots[1], snapshots[3]):
        np.testing.assert_array_equal(mine, best)
    assert any(not np.array_equal(best, last) for best, last in zip(snapshots[1], snapshots[3]))


def test_patience_counts_from_the_last_improvement(synthetic_data, feature_cache, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 1.0, 1.5])
    result = train(read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path,
                   tiny_config(epochs=5, patience=2, steps_per_epoch=2, cache_dir=feature_cache,
                               sample_every_epoch=False), progress=False,
                   log=quiet)
    # A late improvement (epoch 4) resets patience: the run goes on to its last epoch and keeps epoch 4.
    assert not result.stopped_early and len(result.history) == 5 and result.best_epoch == 4


def test_resume_continues_from_the_last_checkpoint(synthetic_data, feature_cache, tmp_path):
    args = (read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path)
    first = train(*args, tiny_config(epochs=1, steps_per_epoch=3, cache_dir=feature_cache), progress=False, log=quiet)
    logs = []
    second = train(*args, tiny_config(epochs=3, steps_per_epoch=3, cache_dir=feature_cache), progress=False,
                   log=logs.append)
    assert any("resuming" in line and "after epoch 1" in line for line in logs)
    assert [r["epoch"] for r in second.history] == [1, 2, 3]
    assert second.history[0] == first.history[0]  # epoch 1 was not rerun


def test_bad_images_are_reported_and_training_goes_on(synthetic_data, feature_cache, tmp_path):
    good = synthetic_data["train"].read_text().splitlines()[:60]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    lines = good + [json.dumps({"image": str(tmp_path / "broken.jpg"), "caption": ["x"]}),
                    json.dumps({"image": str(tmp_path / "absent.jpg"), "caption": ["y"]}), "{oops"]
    manifest_path = tmp_path / "train.jsonl"
    manifest_path.write_text("\n".join(lines).replace('"images/', f'"{synthetic_data["train"].parent}/images/') + "\n")
    logs = []
    result = train(read_manifest(manifest_path), read_manifest(synthetic_data["val"]), tmp_path / "m",
                   tiny_config(epochs=1, cache_dir=feature_cache), progress=False, log=logs.append)
    skipped = [line for line in logs if line.startswith("skipped")]
    assert len(skipped) == 3
    assert any("broken.jpg: not an image" in s for s in skipped) and any("absent.jpg" in s for s in skipped)
    assert any("train.jsonl:63" in s for s in skipped)
    metrics = json.loads((tmp_path / "m/bundle.json").read_text())["metrics"]
    assert metrics["train_images"] == 60 and metrics["train_captions"] == 4 * 60  # the broken rows added none
    assert result.history[0]["loss"] > 0 and np.isfinite(result.history[0]["val_loss"])


def test_no_usable_images_is_an_error(synthetic_data, tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\nnope.jpg,x\n")
    with pytest.raises(CaptioningError, match="m.csv: no usable training examples"):
        train(read_manifest(tmp_path / "m.csv"), read_manifest(synthetic_data["val"]), tmp_path / "o",
              tiny_config(), progress=False, log=quiet)


def test_masked_loss_scores_neither_padding_nor_out_of_vocabulary_words_and_takes_float_labels():
    import tensorflow as tf

    # ids: 0 padding, 1 [UNK], 2 [START], 3 [END], 4 a word. [UNK] is banned in the output (logit -1e9).
    probs = tf.constant([[[0.05, 0.0, 0.05, 0.1, 0.8]] * 3])
    logits = tf.where(tf.range(5) == 1, -1e9, tf.math.log(tf.maximum(probs, 1e-12)))
    loss, count, correct, unknown = masked_loss(tf.constant([[4.0, 1.0, 0.0]]), logits)  # a word, [UNK], padding
    assert float(count) == 1 and float(correct) == 1 and float(unknown) == 1
    np.testing.assert_allclose(float(loss), -np.log(0.8), rtol=1e-4)  # not ~1e9 for the [UNK] label


def test_a_checkpoint_every_k_steps_resumes_mid_epoch_after_the_steps_done(feature_sets, tmp_path):
    from captioning.train import fit, prepare
    from captioning.training.loop import Hook

    config = tiny_config(epochs=1, checkpoint_every=2, sample_every_epoch=False)
    prepared = prepare(feature_sets["train"], feature_sets["val"], config, log=quiet, progress=False)

    class CrashAtStep3(Hook):
        def on_step_end(self, state):
            if state.step == 3:
                raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        fit(prepared, config, tmp_path / "ckpt", None, extra_hooks=[CrashAtStep3()], log=quiet, progress=False)
    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert (saved["epoch"], saved["step"]) == (0, 2)  # the step-2 checkpoint, mid-epoch

    trained = []

    class Steps(Hook):
        def on_step_end(self, state):
            trained.append(state.step)

    logs = []
    _, state = fit(prepared, config, tmp_path / "ckpt", None, extra_hooks=[Steps()], log=logs.append,
                   progress=False)
    assert trained[0] == 3  # steps 1 and 2 are not trained again
    assert state.restores == 1 and any("after epoch 0, step 2" in line for line in logs)
    assert state.epoch == 1 and state.step == 0


def test_float16_training_scales_its_loss(feature_sets, tmp_path):
    import keras

    from captioning.train import fit, prepare
    from captioning.training.loop import Trainer

    config = tiny_config(epochs=1, steps_per_epoch=3, precision="mixed_float16", sample_every_epoch=False)
    prepared = prepare(feature_sets["train"], feature_sets["val"], config, log=quiet, progress=False)
    model, state = fit(prepared, config, tmp_path / "ckpt", None, log=quiet, progress=False)
    assert model.dtype_policy.name == "mixed_float16"
    trainer = Trainer(model, config, __import__("tensorflow").distribute.get_strategy())
    assert trainer.loss_scaling and isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(state.history[0]["loss"]) and np.isfinite(state.history[0]["val_loss"])
    float32 = Trainer(fit(prepared, tiny_config(epochs=1, steps_per_epoch=1, sample_every_epoch=False),
                          tmp_path / "c32", None, log=quiet, progress=False)[0], config,
                      __import__("tensorflow").distribute.get_strategy())
    assert not float32.loss_scaling


def test_a_loss_that_is_not_finite_stops_with_one_clear_error(synthetic_data, feature_cache, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [float("nan")])
    with pytest.raises(CaptioningError, match="epoch 1: the loss is not finite .* --precision float32"):
        train(read_manifest(synthetic_data["train"]), read_manifest(synthetic_data["val"]), tmp_path,
              tiny_config(epochs=2, steps_per_epoch=1, cache_dir=feature_cache), progress=False, log=quiet)


def test_the_time_budget_stops_every_worker_when_any_workers_clock_says_so():
    from captioning.training.hooks import TimeBudget
    from captioning.training.loop import TrainState

    asked = []

    def agree(mine):  # stands in for the all-reduce: another worker's clock ran out
        asked.append(mine)
        return True

    budget = TimeBudget(3600.0, agree)
    state = TrainState(epoch=1)
    budget.on_train_begin(state)
    budget.on_epoch_end(state, {})
    assert asked == [False] and state.stop and "time budget" in state.stop  # this worker's own clock said no
    alone = TimeBudget(3600.0)
    state = TrainState(epoch=1)
    alone.on_epoch_end(state, {})
    assert state.stop is None


def test_an_output_that_cannot_be_written_fails_before_any_training(seaweed, feature_sets, monkeypatch):
    from captioning.storage import StorageError

    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    logs = []
    with pytest.raises(StorageError, match="s3://outputs/m: cannot write here: access denied"):
        train(feature_sets["train"], feature_sets["val"], "s3://outputs/m", tiny_config(), progress=False,
              log=logs.append)
    assert not any(line.startswith("epoch") or "training on" in line for line in logs), logs


def test_a_vocabulary_smaller_than_the_data_keeps_losses_honest(feature_sets, tmp_path):
    # Real data sets have more words than the vocabulary; the synthetic scenes (~40 words) hide that. With 12
    # tokens (8 words) most caption words are [UNK]: the loss must stay a per-word cross-entropy, not ~1e9.
    from dataclasses import replace

    from tests.conftest import TINY_MODEL

    config = tiny_config(model=replace(TINY_MODEL, vocab_size=12), epochs=2, sample_every_epoch=False)
    done = train(feature_sets["train"], feature_sets["val"], tmp_path / "small-vocab", config, progress=False,
                 log=quiet)
    for row in done.history:
        assert np.isfinite(row["loss"]) and row["loss"] < 20 and row["val_loss"] < 20, row
        assert 0.2 < row["oov"] < 1 and 0.2 < row["val_oov"] < 1, row  # reported, and most words are unknown
    assert done.history[-1]["loss"] < done.history[0]["loss"]
    assert done.history[-1]["val_loss"] != done.history[0]["val_loss"]  # not pinned by a 1e9 term
    assert done.best_epoch == min(done.history, key=lambda row: row["val_loss"])["epoch"]
    written = json.loads((tmp_path / "small-vocab" / "history.json").read_text())
    assert [row["val_oov"] for row in written] == [row["val_oov"] for row in done.history]


def test_epoch_sums_keep_a_1e4_change_of_the_mean_loss_visible_at_a_million_tokens():
    from captioning.training.loop import Totals

    def mean_loss(per_token):
        totals = Totals()
        for _ in range(1000):  # a million tokens, as 1000 batches of 1000
            totals.add(np.float32(per_token * 1000), np.float32(1000), np.float32(0), np.float32(0))
        return totals.loss

    assert mean_loss(2.3457) - mean_loss(2.3456) == pytest.approx(1e-4, rel=1e-2)


def test_early_stopping_keeps_the_epoch_with_the_lowest_honest_validation_loss():
    from captioning.training.hooks import EarlyStopping
    from captioning.training.loop import TrainState

    class Weights:  # stands in for the model: its "weights" are the epoch they were taken at
        epoch = 0

        def get_weights(self):
            return [self.epoch]

        def set_weights(self, weights):
            self.restored = weights

    model, state, logs = Weights(), TrainState(), []
    early = EarlyStopping(model, patience=2, log=logs.append)
    # Losses a few 1e-4 apart, as on a real data set: the best is epoch 3, then two epochs without improvement.
    for epoch, val_loss in enumerate([3.2061, 3.2059, 3.2057, 3.20575, 3.2058], start=1):
        model.epoch = state.epoch = epoch
        row = {"epoch": epoch, "val_loss": val_loss}
        state.history.append(row)
        early.on_epoch_end(state, row)
        if state.stop:
            break
    early.on_train_end(state)
    assert state.best_epoch == 3 and state.stopped_early and model.restored == [3]
    assert state.history[-1]["epoch"] == 5 and "from epoch 3 (val_loss 3.2057)" in logs[-1]


def test_the_backbone_has_its_own_seed_so_training_seeds_compare_on_the_same_features(synthetic_data, feature_cache,
                                                                                       trained_bundle):
    from captioning.train import prepare

    # The trained bundle used training seed 1 and backbone seed 1; training seed 8 must reuse its features.
    runs = [prepare(synthetic_data["train"], synthetic_data["val"], tiny_config(seed=seed), None, feature_cache,
                    log=quiet, progress=False) for seed in (1, 8)]
    assert runs[0].train == runs[1].train and runs[0].val == runs[1].val
    other = prepare(synthetic_data["val"], synthetic_data["val"], tiny_config(backbone_seed=2), None, feature_cache,
                    log=quiet, progress=False)
    assert other.train.split("/")[-2] != runs[0].train.split("/")[-2]  # another backbone, other features
    backbone = json.loads((trained_bundle / "bundle.json").read_text())["backbone"]
    assert backbone["seed"] == 1 and backbone["weights_source"] == "none"
