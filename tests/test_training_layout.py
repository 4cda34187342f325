"""Training batches without padding compute: trimmed tokens, whole images per batch, one trace per bucket."""

from __future__ import annotations

import numpy as np
import pytest

from captioning.featureset import FeatureSet
from captioning.text import Tokenizer
from captioning.training.data import TOKEN_BUCKET, StreamingInput, image_bucket, pack, token_bucket
from tests.conftest import TINY_MODEL, tiny_config


def batches_of(split: FeatureSet, tok: Tokenizer, train: bool, count: int, **layout) -> list:
    stream = StreamingInput(split, tok, 32, 1, train, seed=3, buffer=64, **layout)
    return list(stream.dataset(0, 32, stream.steps).take(count))


def test_buckets_are_a_small_fixed_set():
    assert [int(token_bucket(n, 32)) for n in (2, 9, 10, 17, 18, 30, 32, 40)] == [8, 8, 16, 16, 24, 31, 31, 31]
    assert int(token_bucket(1, 32)) == 1 and TOKEN_BUCKET == 8
    assert [image_bucket(n, 32) for n in (1, 4, 5, 8, 9, 31, 32)] == [4, 4, 8, 8, 12, 32, 32]
    assert [image_bucket(n, 5) for n in (1, 3, 5)] == [1, 3, 5]


def test_packing_splits_an_image_over_two_batches_and_indexes_every_caption_to_its_image():
    images = [(np.full((49, 2), i, np.float16), [f"c{i}.{j}" for j in range(3)]) for i in range(3)]
    first, second = list(pack(iter(images), 4, 2, 2, group=True))
    features, captions, index, real = first
    assert list(captions) == ["c0.0", "c0.1", "c0.2", "c1.0"] and list(index) == [0, 0, 0, 1] and real.all()
    assert features.shape == (2, 49, 2) and features[1, 0, 0] == 1  # a batch of 4 pads images to a multiple of 1
    features, captions, index, real = second  # image 1's other captions, then image 2's: 5 of 4 rows
    assert list(captions) == ["c1.1", "c1.2", "c2.0", "c2.1"] and list(index) == [0, 0, 1, 1]
    assert [features[i, 0, 0] for i in index] == [1, 1, 2, 2]
    features, captions, index, real = next(pack(iter(images[:1]), 4, 1, 2, group=False))
    assert list(index) == [0, 1, 2, 3] and list(real) == [True, True, True, False] and features.shape[0] == 4
    assert [features[i, 0, 0] for i in range(3)] == [0, 0, 0]


def test_trimmed_batches_keep_every_token_and_mask_the_rest(feature_sets):
    import tensorflow as tf

    from captioning.training.loop import masked_loss

    val = FeatureSet(feature_sets["val"])
    tok = Tokenizer.build(val.captions(), 100, 20)
    trimmed = batches_of(val, tok, False, 2)
    fixed = batches_of(val, tok, False, 2, trim=False)
    model = __import__("captioning.model", fromlist=["Captioner"]).Captioner(TINY_MODEL, tok)
    model.build_for(val.channels)
    for ((features, tokens, index), labels), ((_, full, _), full_labels) in zip(trimmed, fixed):
        positions = tokens.shape[1]
        assert full.shape[1] == 19 and positions < 19 and positions % TOKEN_BUCKET == 0
        assert tok.decode(tokens.numpy()) == tok.decode(full.numpy())  # no caption lost a word
        assert not full_labels.numpy()[:, positions:].any()  # nothing scored past the trim
        np.testing.assert_array_equal(labels.numpy(), full_labels.numpy()[:, :positions])
        # Causal attention: positions past the trim change nothing before them, so the masked loss is the same.
        short = masked_loss(labels, model((features, tokens, index)))
        long = masked_loss(full_labels, model((features, full, index)))
        np.testing.assert_allclose([float(x) for x in short], [float(x) for x in long], rtol=1e-5)
        assert float(short[1]) == float(tf.reduce_sum(tf.cast(labels > 1, tf.float32)))  # scored: real words only


def test_grouped_by_image_loss_and_gradients_equal_per_caption_ones(feature_sets):
    import tensorflow as tf

    from captioning.model import Captioner
    from captioning.training.loop import masked_loss

    train = FeatureSet(feature_sets["train"])
    tok = Tokenizer.build(train.captions(), 100, 20)
    (features, tokens, index), labels = batches_of(train, tok, True, 1)[0]
    assert features.shape[0] < 32 and len(set(index.numpy())) < 32  # images shared by captions, stored once
    model = Captioner(TINY_MODEL, tok)
    model.build_for(train.channels)

    def loss_and_grads(*inputs):
        with tf.GradientTape() as tape:
            total, count, _, _ = masked_loss(labels, model(inputs, training=True))
            loss = total / count
        return float(loss), tape.gradient(loss, model.trainable_variables)

    grouped, grouped_grads = loss_and_grads(features, tokens, index)
    per_caption, per_caption_grads = loss_and_grads(tf.gather(features, index), tokens)  # one image row each
    assert grouped == pytest.approx(per_caption, rel=1e-6)
    for variable, a, b in zip(model.trainable_variables, grouped_grads, per_caption_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=variable.path)


@pytest.mark.parametrize("xla", ["off", "on"])
def test_the_step_is_traced_once_per_bucket_not_once_per_batch(feature_sets, xla):
    import tensorflow as tf

    from captioning.model import Captioner
    from captioning.training.loop import Trainer

    train = FeatureSet(feature_sets["train"])
    tok = Tokenizer.build(train.captions(), 100, 20)
    model = Captioner(TINY_MODEL, tok)
    model.build_for(train.channels)
    trainer = Trainer(model, tiny_config(xla=xla), tf.distribute.get_strategy())
    batches = batches_of(train, tok, True, 6)
    # Shorter captions make a second token bucket: the same images, half as many words.
    short = [((f, t[:, :TOKEN_BUCKET], i), lab[:, :TOKEN_BUCKET]) for (f, t, i), lab in batches[:2]]
    shapes = []
    for batch in batches + short + batches:
        trainer._train_step(batch)
        shapes.append(tuple(tuple(x.shape) for x in tf.nest.flatten(batch)))
    assert len(set(shapes)) >= 2
    assert sorted(trainer.traces["train"]) == sorted(set(shapes))  # each shape traced once, however often seen
    assert trainer.xla == (xla == "on")


def test_the_input_is_declared_endless_so_a_distributed_iterator_skips_its_partial_batch_check(feature_sets):
    import tensorflow as tf

    train = FeatureSet(feature_sets["train"])
    tok = Tokenizer.build(train.captions(), 100, 20)
    stream = StreamingInput(train, tok, 32, 1, True, seed=3, buffer=64)
    data = stream.dataset(0, 32, stream.steps)
    # Batches vary in shape, so without this every step would pay for a check and a cross-replica reduce.
    assert data.cardinality() == tf.data.INFINITE_CARDINALITY
    assert data.element_spec[0][1].shape.as_list() == [32, None]
    assert len(list(data.take(3 * stream.steps))) == 3 * stream.steps  # and it is: epoch after epoch
