"""Train a captioner: features, vocabulary and model, then the epoch loop with its hooks, then the bundle."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from captioning.bundle import save_bundle
from captioning.config import TrainConfig
from captioning.errors import CaptioningError
from captioning.features import Backbone, FeatureCache
from captioning.generate import GenerationConfig, Generator
from captioning.manifest import Manifest
from captioning.model import BANNED, Captioner, output_bias
from captioning.text import Tokenizer
from captioning.training.data import batches, cache_features, steps_per_epoch
from captioning.training.hooks import Checkpoints, EarlyStopping, History, SampleCaption, TimeBudget
from captioning.training.loop import EpochLoop, Trainer, TrainState

CHECKPOINT = "checkpoint"


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

    early = EarlyStopping(model, config.patience, log)
    checkpoints = Checkpoints(checkpoint, trainer, early, writer=shard[0] == 0)
    if checkpoints.exists():
        state = checkpoints.restore()
        log(f"resuming from {checkpoint} after epoch {state.epoch}")
    else:
        state = TrainState()
        checkpoint.mkdir(parents=True, exist_ok=True)
        tokenizer.save(vocab_file)
        backbone.save(checkpoint / "backbone.weights.h5")

    steps = steps_per_epoch(len(train_pairs), config.batch_size, shard[1], train=True)
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    val_steps = steps_per_epoch(len(val_pairs), config.batch_size, shard[1], train=False)
    train_data = batches(train_pairs, cache, tokenizer, config.batch_size, steps, config.seed, shard)
    val_data = batches(val_pairs, cache, tokenizer, config.batch_size, val_steps, None, shard)

    sampler = Generator(model, GenerationConfig(attention=False))
    sample_key = next(iter(val_pairs.first_key))
    sample = SampleCaption(lambda: sampler(cache.get(sample_key)[np.newaxis].astype(np.float32)).captions[0],
                           Path(val_pairs.first_key[sample_key].image).name, log)
    # Order matters: early stopping decides what is best before the checkpoint records it.
    hooks = [early, checkpoints, History(out, writer=shard[0] == 0), TimeBudget(config.max_seconds)]
    if config.sample_every_epoch:
        hooks.insert(1, sample)
    state = EpochLoop(trainer, config.epochs, hooks, log, progress).run(train_data, val_data, steps, val_steps, state)

    best = state.history[state.best_epoch - 1]
    metrics = {"best_epoch": state.best_epoch, **{k: v for k, v in best.items() if k != "epoch"},
               "train_images": len(train_pairs.first_key), "train_captions": len(train_pairs)}
    version = save_bundle(out, model, backbone, metrics)
    return TrainResult(out, state.history, state.best_epoch, state.stopped_early, version)
