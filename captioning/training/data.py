"""Training input: a feature set streamed shard by shard, each worker its own shards, equal steps for all.

Nothing here holds a whole split: a pipeline reads one shard at a time (memory-mapped when local) and mixes
pairs in a bounded shuffle buffer, the WebDataset/tf.data way, so memory does not grow with the shard count.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from captioning.errors import CaptioningError
from captioning.featureset import FeatureSet, ShardInfo
from captioning.text import Tokenizer

Pair = tuple[np.ndarray, str]  # features (49, C) float16, one caption


def split_shards(shards: list[ShardInfo], pipelines: int) -> list[list[ShardInfo]]:
    """Shards per input pipeline (worker): every shard read by exactly one, so no pair twice per epoch."""
    return [shards[index::pipelines] for index in range(pipelines)]


def steps_per_epoch(pairs_per_pipeline: list[int], per_pipeline_batch: int, train: bool) -> int:
    """Steps every worker runs: the same number on each, or collectives across workers hang.

    Training stops at the smallest worker's last full batch (each epoch reshuffles the shard order, so no
    pair is left out for good); validation runs to the largest worker's last batch, padding with masked rows,
    so every validation pair counts exactly once.
    """
    if train:
        steps = min(pairs // per_pipeline_batch for pairs in pairs_per_pipeline)
    else:
        steps = max(math.ceil(pairs / per_pipeline_batch) for pairs in pairs_per_pipeline)
    if steps < 1:
        raise CaptioningError(f"{sum(pairs_per_pipeline)} caption pairs",
                              f"fewer than one batch of {per_pipeline_batch} for each of {len(pairs_per_pipeline)} "
                              f"worker(s) (the smallest worker's shards hold {min(pairs_per_pipeline)}); use a "
                              "smaller --batch-size, or more, smaller feature shards")
    return steps


def shuffled(items: Iterator[Pair], size: int, rng: np.random.Generator) -> Iterator[Pair]:
    """A bounded shuffle buffer: holds at most `size` items, emits a random one as each new one arrives."""
    buffer: list[Pair] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = int(rng.integers(len(buffer)))
        yield buffer[pick]
        buffer[pick] = item
    rng.shuffle(buffer)
    yield from buffer


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # features (U, 49, C), captions (B,), image (B,), real (B,)
TOKEN_BUCKET = 8  # caption positions are padded to a multiple of this, so a few shapes (traces) cover every batch


def token_bucket(longest: int | tf.Tensor, max_length: int) -> tf.Tensor:
    """Input positions of a batch whose longest caption has `longest` tokens ([START] and [END] included): the
    decoder reads all but the last token, padded up to a multiple of TOKEN_BUCKET, never past max_length - 1."""
    padded = (longest - 1 + TOKEN_BUCKET - 1) // TOKEN_BUCKET * TOKEN_BUCKET
    return tf.minimum(max_length - 1, tf.maximum(1, padded))


def image_bucket(images: int, batch: int) -> int:
    """Image rows of a batch of `batch` captions over `images` distinct images: padded up to a multiple of an
    eighth of the batch, so at most 8 shapes, with at most an eighth of the batch's rows wasted."""
    step = max(1, batch // 8)
    return min(batch, -(-images // step) * step)


def pack(images: Iterator[tuple[np.ndarray, list[str]]], batch: int, count: int, channels: int,
         group: bool) -> Iterator[Batch]:
    """`count` batches of `batch` captions from images in order (the rest of an image's captions go on in the
    next batch); rows past the captions are masked padding. group: each image's features once per batch, with
    an index from caption to image row; else one features row per caption (the per-caption layout)."""
    pending: list[tuple[np.ndarray, str]] = []
    for _ in range(count):
        while len(pending) < batch:
            item = next(images, None)
            if item is None:
                break
            pending.extend((item[0], caption) for caption in item[1])
        chosen, pending = pending[:batch], pending[batch:]
        rows: list[np.ndarray] = []
        index = np.zeros(batch, np.int32)
        for i, (image, _) in enumerate(chosen):
            if not group or not rows or rows[-1] is not image:
                rows.append(image)
            index[i] = len(rows) - 1
        if not group:
            index = np.arange(batch, dtype=np.int32)
        height = image_bucket(max(len(rows), 1), batch) if group else batch  # >= 1 row: padding gathers row 0
        features = np.zeros((height, 49, channels), np.float16)
        for i, image in enumerate(rows):
            features[i] = image
        captions = np.array([c for _, c in chosen] + [""] * (batch - len(chosen)), dtype=object)
        yield features, captions, index, np.arange(batch) < len(chosen)


class StreamingInput:
    """tf.data input for one split: call with a tf.distribute.InputContext (distribute_datasets_from_function).

    global_batch pairs make one step across all replicas; each pipeline (worker) reads split_shards' share.
    group: batches hold whole images (shuffled by image, each image's features once per batch); else pairs are
    shuffled and each caption carries its own copy of its image (the tutorial's layout). trim: tokens padded to
    the batch's token_bucket, not to max_length.
    """

    def __init__(self, features: FeatureSet, tokenizer: Tokenizer, global_batch: int, pipelines: int,
                 train: bool, seed: int = 0, buffer: int = 2048, group: bool = True, trim: bool = True) -> None:
        if global_batch % pipelines:
            raise CaptioningError("--batch-size", f"the global batch {global_batch} does not split evenly over "
                                  f"{pipelines} workers")
        if train and len(features.shards) < pipelines:  # validation pads an idle worker's batches instead
            raise CaptioningError(features.location, f"has {len(features.shards)} shard(s) for {pipelines} workers; "
                                  "make the features with a smaller --shard-size")
        self.features, self.tokenizer, self.global_batch = features, tokenizer, global_batch
        self.pipelines, self.train, self.seed, self.buffer = pipelines, train, seed, buffer
        self.group, self.trim = group, trim
        self.parts = split_shards(features.shards, pipelines)
        self.pairs = [sum(s.pairs for s in part) for part in self.parts]
        self.steps = steps_per_epoch(self.pairs, global_batch // pipelines, train)
        self.epoch = 0  # the next epoch's number: it seeds the shard order, so a resumed run replays it exactly

    def __call__(self, context: tf.distribute.InputContext) -> tf.data.Dataset:
        """This pipeline's per-replica batches: steps x its replicas of them, each global_batch / replicas."""
        replicas = context.num_replicas_in_sync // context.num_input_pipelines
        per_replica = context.get_per_replica_batch_size(self.global_batch)
        return self.dataset(context.input_pipeline_id, per_replica, self.steps * replicas)

    def images_of(self, pipeline: int, epoch: int) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Every image of this pipeline's shards with its captions; in training the shard order is shuffled per
        epoch and images (grouped) or pairs (not grouped) mixed in the shuffle buffer."""
        order = list(self.parts[pipeline])
        rng = np.random.default_rng([self.seed, epoch, pipeline])
        if self.train:
            rng.shuffle(order)

        def in_order() -> Iterator[tuple[np.ndarray, list[str]]]:
            for shard in order:
                features, records = self.features.features(shard.name), self.features.records(shard.name)
                for record in records:
                    if record["offset"] is None:
                        continue
                    image = np.array(features[record["offset"]])  # a copy: the shard is released after its rows
                    if self.group:
                        yield image, list(record["captions"])
                    else:
                        yield from ((image, [caption]) for caption in record["captions"])

        return iter(shuffled(in_order(), self.buffer, rng)) if self.train else in_order()

    def pairs_of(self, pipeline: int, epoch: int) -> Iterator[Pair]:
        """Every pair of this pipeline's shards in the order batches take them."""
        for image, captions in self.images_of(pipeline, epoch):
            for caption in captions:
                yield image, caption

    def batches(self, pipeline: int, batch: int, count: int) -> Iterator[Batch]:
        """Epoch after epoch, exactly `count` batches (see pack); endless: one iterator serves the whole run (a new
        one per epoch costs a retrace)."""
        while True:
            epoch = self.epoch
            self.epoch += 1
            yield from pack(self.images_of(pipeline, epoch), batch, count, self.features.channels, self.group)

    def dataset(self, pipeline: int, batch: int, count: int) -> tf.data.Dataset:
        """The batches as an endless tf.data pipeline of ((features, input tokens, image index), labels), labels 0
        on padding; `count` of them make one epoch."""
        channels, tokenizer, trim = self.features.channels, self.tokenizer, self.trim
        data = tf.data.Dataset.from_generator(
            lambda: self.batches(pipeline, batch, count),
            output_signature=(tf.TensorSpec([None, 49, channels], tf.float16), tf.TensorSpec([batch], tf.string),
                              tf.TensorSpec([batch], tf.int32), tf.TensorSpec([batch], tf.bool)),
        )

        @tf.autograph.experimental.do_not_convert  # no control flow; AutoGraph trips on the sibling generator
        def to_model_inputs(features: tf.Tensor, captions: tf.Tensor, index: tf.Tensor, real: tf.Tensor):
            tokens = tokenizer.encode(captions)  # (B, max_length)
            if trim:
                longest = tf.reduce_max(tf.reduce_sum(tf.cast(tokens != 0, tf.int32), axis=1))
                tokens = tokens[:, : token_bucket(longest, tokenizer.max_length) + 1]
            labels = tokens[:, 1:] * tf.cast(real[:, tf.newaxis], tokens.dtype)  # padding rows: all masked
            return (tf.cast(features, tf.float32), tokens[:, :-1], index), labels

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        # Declared endless (it is): a distributed iterator then skips the per-step check, eager ops and a
        # cross-replica reduce, that batches of varying shape otherwise cost (4 ms a step, 12% of it).
        endless = tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
        return data.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2).apply(endless) \
            .with_options(options)
