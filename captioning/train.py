"""Training: feature caching, the strategy-aware custom step, early stopping, checkpoints, history, curves."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from captioning.atomic import atomic_path, atomic_write
from captioning.bundle import save_bundle
from captioning.config import TrainConfig
from captioning.errors import CaptioningError
from captioning.features import Backbone, FeatureCache
from captioning.fetch import Fetcher, is_url
from captioning.generate import GenerationConfig, Generator
from captioning.images import load_image
from captioning.manifest import Example, Manifest
from captioning.model import BANNED, Captioner, output_bias
from captioning.plots import plot_history
from captioning.storage import Storage
from captioning.text import Tokenizer

CHECKPOINT = "checkpoint"


def feature_key(source: str) -> str:
    """Cache key: URL, or path plus size and mtime, so a rewritten file is recomputed."""
    if is_url(source):
        ident = source
    else:
        try:
            stat = os.stat(source)
            ident = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            ident = os.path.abspath(source)
    return hashlib.sha1(ident.encode()).hexdigest()


@dataclass
class CaptionPairs:
    """(feature key, caption) pairs of the examples whose images loaded; one per caption."""

    keys: list[str]
    captions: list[str]
    first_key: dict[str, Example]  # key -> example, for sample captions and reports

    def __len__(self) -> int:
        return len(self.keys)


def cache_features(
    manifest: Manifest, cache: FeatureCache, config: TrainConfig, log: Callable[[str], None]
) -> CaptionPairs:
    """Compute missing features; every image that fails is reported by name and left out of the pairs."""
    fetcher, storage = Fetcher(config.fetch), Storage(config.storage)
    items = [(feature_key(ex.image), ex.image) for ex in manifest.examples]
    errors = cache.fill(items, lambda src: load_image(src, config.image, fetcher, storage))
    for key, err in errors.items():
        log(f"skipped image {err}")
    for err in manifest.errors:
        log(f"skipped row {err}")
    keys, captions, examples = [], [], {}
    for ex in manifest.examples:
        key = feature_key(ex.image)
        if key in cache:
            examples[key] = ex
            for caption in ex.captions:
                keys.append(key)
                captions.append(caption)
    return CaptionPairs(keys, captions, examples)


def batches(
    pairs: CaptionPairs, cache: FeatureCache, tokenizer: Tokenizer, batch_size: int,
    seed: int | None, shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """((features, input tokens), label tokens) batches; shuffled anew each pass when seed is set."""
    channels = cache.backbone.channels
    index, count = shard
    epoch = [0]

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.arange(len(pairs))
        if seed is not None:
            np.random.default_rng([seed, epoch[0]]).shuffle(order)
            epoch[0] += 1
        # Each worker takes its own slice, so no pair is seen twice per epoch across workers.
        order = order[index::count]
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            features = np.stack([cache.get(pairs.keys[i]) for i in chosen]).astype(np.float32)
            yield features, np.array([pairs.captions[i] for i in chosen], dtype=object)

    data = tf.data.Dataset.from_generator(
        generate,
        output_signature=(tf.TensorSpec([None, 49, channels], tf.float32), tf.TensorSpec([None], tf.string)),
    )

    @tf.autograph.experimental.do_not_convert  # no control flow; AutoGraph trips on the sibling generator
    def to_model_inputs(features: tf.Tensor, captions: tf.Tensor):
        tokens = tokenizer.encode(captions)
        return (features, tokens[:, :-1]), tokens[:, 1:]

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return data.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2).with_options(options)


def masked_loss(labels: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Summed cross-entropy, token count and correct predictions over non-padding labels."""
    labels = tf.cast(labels, tf.int64)  # Keras can hand labels over as float
    mask = tf.cast(labels != 0, tf.float32)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    correct = tf.cast(tf.argmax(logits, axis=-1) == labels, tf.float32)
    return tf.reduce_sum(loss * mask), tf.reduce_sum(mask), tf.reduce_sum(correct * mask)


class Trainer:
    """Owns the model, optimizer and strategy; train_epoch/evaluate run under strategy.run."""

    def __init__(self, model: Captioner, config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
        self.model, self.config, self.strategy = model, config, strategy
        with strategy.scope():
            self.optimizer = keras.optimizers.Adam(config.learning_rate)
            self.optimizer.build(model.trainable_variables)
        self._train_step = tf.function(self._distributed(self._train_replica))
        self._eval_step = tf.function(self._distributed(self._eval_replica))

    def _distributed(self, replica_fn: Callable) -> Callable:
        @tf.autograph.experimental.do_not_convert
        def step(batch):
            sums = self.strategy.run(replica_fn, args=(batch,))
            return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in sums]
        return step

    def _train_replica(self, batch):
        (features, tokens), labels = batch
        with tf.GradientTape() as tape:
            logits = self.model((features, tokens), training=True)
            loss_sum, count, correct = masked_loss(labels, logits)
            # Mean over this replica's tokens; gradients from replicas are summed, hence the division.
            loss = loss_sum / tf.maximum(count, 1.0) / self.strategy.num_replicas_in_sync
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss_sum, count, correct

    def _eval_replica(self, batch):
        (features, tokens), labels = batch
        return masked_loss(labels, self.model((features, tokens), training=False))

    def run_epoch(self, data: tf.data.Dataset, train: bool, steps: int | None, desc: str, progress: bool) -> dict:
        """One pass; returns mean masked loss and accuracy."""
        step_fn = self._train_step if train else self._eval_step
        totals = np.zeros(3)
        bar = tqdm(total=steps, desc=desc, unit="batch", disable=not progress, leave=False, file=sys.stderr)
        for i, batch in enumerate(self.strategy.experimental_distribute_dataset(data)):
            if steps is not None and i >= steps:
                break
            totals += np.array([float(v) for v in step_fn(batch)])
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / max(totals[1], 1):.3f}", acc=f"{totals[2] / max(totals[1], 1):.3f}")
        bar.close()
        return {"loss": totals[0] / max(totals[1], 1), "accuracy": totals[2] / max(totals[1], 1)}

    def save_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        """Last weights, optimizer slots (npz, no pickle) and loop state; state.json is written last."""
        with atomic_path(folder / "last.weights.h5") as tmp:
            self.model.save_weights(str(tmp))
        with atomic_path(folder / "optimizer.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, *[v.numpy() for v in self.optimizer.variables])
        atomic_write(folder / "state.json", json.dumps(state).encode())

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Inverse of save_checkpoint."""
        self.model.load_weights(str(folder / "last.weights.h5"))
        with np.load(folder / "optimizer.npz", allow_pickle=False) as saved:
            for i, variable in enumerate(self.optimizer.variables):
                variable.assign(saved[f"arr_{i}"])
        return json.loads((folder / "state.json").read_text())


@dataclass
class TrainResult:
    """What a training run produced."""

    bundle: Path
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool
    version: str


def train(
    train_manifest: Manifest,
    val_manifest: Manifest,
    out: str | Path,
    config: TrainConfig,
    strategy: tf.distribute.Strategy | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a captioner and write its bundle to out (resuming from out/checkpoint if present)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    checkpoint = out / CHECKPOINT
    backbone_weights = config.weights
    if (checkpoint / "backbone.weights.h5").exists():
        backbone_weights = str(checkpoint / "backbone.weights.h5")  # resume on the very same features
    backbone = Backbone(config.model.backbone, backbone_weights, seed=config.seed)
    backbone.weights_source = config.weights
    cache = FeatureCache(config.cache_dir or out / "feature-cache", backbone)
    train_pairs = cache_features(train_manifest, cache, config, log)
    val_pairs = cache_features(val_manifest, cache, config, log)
    if not len(train_pairs):
        raise CaptioningError(train_manifest.source, "no usable training examples (every image or row failed)")
    if not len(val_pairs):
        raise CaptioningError(val_manifest.source, "no usable validation examples")
    log(f"training on {len(train_pairs)} captions of {len(train_pairs.first_key)} images, "
        f"validating on {len(val_pairs)} captions of {len(val_pairs.first_key)} images")

    vocab_file = checkpoint / "vocabulary.json"
    if vocab_file.exists():
        tokenizer = Tokenizer.load(vocab_file)
    else:
        tokenizer = Tokenizer.build(train_pairs.captions, config.model.vocab_size, config.model.max_length)
    model_config = replace(config.model, vocab_size=tokenizer.size)
    with strategy.scope():
        bias = output_bias(tokenizer.token_counts(train_pairs.captions), [tokenizer.id(t) for t in BANNED])
        model = Captioner(model_config, tokenizer, bias)
        model.build_for(backbone.channels)
    trainer = Trainer(model, config, strategy)

    state: dict[str, Any] = {"epoch": 0, "best_loss": math.inf, "best_epoch": -1, "wait": 0, "history": []}
    if (checkpoint / "state.json").exists():
        state = trainer.load_checkpoint(checkpoint)
        log(f"resuming from {checkpoint} after epoch {state['epoch']}")
    else:
        checkpoint.mkdir(parents=True, exist_ok=True)
        tokenizer.save(vocab_file)
        backbone.save(checkpoint / "backbone.weights.h5")

    train_data = batches(train_pairs, cache, tokenizer, config.batch_size, config.seed, shard)
    val_data = batches(val_pairs, cache, tokenizer, config.batch_size, None, shard)
    steps = math.ceil(len(train_pairs) / config.batch_size / shard[1])
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    sampler = Generator(model, GenerationConfig(attention=False))
    sample_key = next(iter(val_pairs.first_key))
    stopped_early = False
    started = time.monotonic()
    for epoch in range(state["epoch"], config.epochs):
        train_metrics = trainer.run_epoch(train_data, True, steps, f"epoch {epoch + 1}/{config.epochs}", progress)
        val_metrics = trainer.run_epoch(val_data, False, None, "validation", progress)
        row = {"epoch": epoch + 1, "loss": train_metrics["loss"], "accuracy": train_metrics["accuracy"],
               "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"]}
        state["history"].append(row)
        sample = sampler(cache.get(sample_key)[np.newaxis].astype(np.float32)).captions[0]
        log(f"epoch {epoch + 1}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}")
        if config.sample_every_epoch:
            log(f"  sample for {Path(val_pairs.first_key[sample_key].image).name}: {sample}")
        if row["val_loss"] < state["best_loss"]:
            state.update(best_loss=row["val_loss"], best_epoch=epoch + 1, wait=0)
            with atomic_path(checkpoint / "best.weights.h5") as tmp:
                model.save_weights(str(tmp))
        else:
            state["wait"] += 1
        state["epoch"] = epoch + 1
        trainer.save_checkpoint(checkpoint, state)
        write_history(out, state["history"])
        if state["wait"] >= config.patience:
            log(f"early stopping: val_loss has not improved for {config.patience} epochs")
            stopped_early = True
            break
        if config.max_seconds is not None and time.monotonic() - started > config.max_seconds:
            log(f"time budget of {config.max_seconds:.0f} s used up after epoch {epoch + 1}")
            break

    model.load_weights(str(checkpoint / "best.weights.h5"))
    best = state["history"][state["best_epoch"] - 1]
    log(f"restored the best weights, from epoch {state['best_epoch']} (val_loss {best['val_loss']:.4f})")
    metrics = {"best_epoch": state["best_epoch"], **{k: v for k, v in best.items() if k != "epoch"},
               "train_images": len(train_pairs.first_key), "train_captions": len(train_pairs)}
    version = save_bundle(out, model, backbone, metrics)
    return TrainResult(out, state["history"], state["best_epoch"], stopped_early, version)


def write_history(out: Path, history: Sequence[dict[str, float]]) -> None:
    """history.csv, history.json and training_curves.png in the model directory."""
    if not history:
        return
    with atomic_path(out / "history.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write(out / "history.json", json.dumps(list(history), indent=2).encode())
    plot_history(history, out / "training_curves.png")
