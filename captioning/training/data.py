"""Training data: image features from the cache, caption pairs, and tf.data batches with equal steps per worker."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from captioning.config import TrainConfig
from captioning.errors import CaptioningError
from captioning.features import FeatureCache
from captioning.fetch import Fetcher, is_url
from captioning.images import load_image
from captioning.manifest import Example, Manifest
from captioning.storage import Storage
from captioning.text import Tokenizer


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
    for err in errors.values():
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


def steps_per_epoch(pairs: int, batch_size: int, workers: int, train: bool) -> int:
    """Steps every worker runs: the same number on each, or collectives across workers hang.

    Training drops the remainder (each epoch reshuffles, so no pair is left out for good); validation pads
    the last batch with masked rows, so every pair counts exactly once.
    """
    per_step = batch_size * workers
    steps = pairs // per_step if train else math.ceil(pairs / per_step)
    if steps < 1:
        raise CaptioningError(f"{pairs} caption pairs", f"fewer than one batch of {batch_size} for each of "
                              f"{workers} worker(s); use a smaller --batch-size")
    return steps


def batches(
    pairs: CaptionPairs, cache: FeatureCache, tokenizer: Tokenizer, batch_size: int, steps: int,
    seed: int | None, shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """Exactly `steps` batches of ((features, input tokens), labels) for one worker; shuffled anew each pass
    when seed is set. Rows past the worker's pairs are padding whose labels are all 0 (masked out)."""
    channels = cache.backbone.channels
    index, count = shard
    epoch = [0]

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        order = np.arange(len(pairs))
        if seed is not None:
            np.random.default_rng([seed, epoch[0]]).shuffle(order)
            epoch[0] += 1
        # Each worker takes its own slice, so no pair is seen twice per epoch across workers.
        mine = order[index::count][: steps * batch_size]
        for step in range(steps):
            chosen = mine[step * batch_size : (step + 1) * batch_size]
            pad = batch_size - len(chosen)
            features = np.stack([cache.get(pairs.keys[i]) for i in chosen]).astype(np.float32) if len(chosen) \
                else np.zeros((0, 49, channels), np.float32)
            captions = [pairs.captions[i] for i in chosen]
            if pad:
                features = np.concatenate([features, np.zeros((pad, 49, channels), np.float32)])
                captions += [""] * pad
            real = np.arange(batch_size) < len(chosen)
            yield features, np.array(captions, dtype=object), real

    data = tf.data.Dataset.from_generator(
        generate,
        output_signature=(tf.TensorSpec([None, 49, channels], tf.float32), tf.TensorSpec([None], tf.string),
                          tf.TensorSpec([None], tf.bool)),
    )

    @tf.autograph.experimental.do_not_convert  # no control flow; AutoGraph trips on the sibling generator
    def to_model_inputs(features: tf.Tensor, captions: tf.Tensor, real: tf.Tensor):
        tokens = tokenizer.encode(captions)
        labels = tokens[:, 1:] * tf.cast(real[:, tf.newaxis], tokens.dtype)  # padding rows: all masked
        return (features, tokens[:, :-1]), labels

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return data.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2).with_options(options)
