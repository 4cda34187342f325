import numpy as np
import pytest
import tensorflow as tf

from captioning.config import ModelConfig
from captioning.model import BANNED, Captioner, SeqEmbedding, output_bias
from captioning.text import Tokenizer

CAPTIONS = ["a red circle", "a blue square left of a red circle", "a green star", "two red circles"]


@pytest.fixture(scope="module")
def model():
    tok = Tokenizer.build(CAPTIONS, 100, 12)
    bias = output_bias(tok.token_counts(CAPTIONS), [tok.id(t) for t in BANNED])
    m = Captioner(ModelConfig(max_length=12, d_model=32, num_layers=2, num_heads=4, dropout=0.0), tok, bias)
    m.build_for(576)
    return m


def test_position_embedding_broadcasts_over_batches():
    layer = SeqEmbedding(10, 8, 4)
    out = layer(tf.constant([[1, 2, 3], [1, 2, 3], [4, 5, 6]]))
    assert out.shape == (3, 3, 4)
    np.testing.assert_allclose(out[0], out[1])


def test_batched_forward_shapes_and_attention(model):
    features = tf.random.normal([5, 49, 576])
    tokens = tf.random.uniform([5, 11], 0, model.tokenizer.size, tf.int64)
    logits, attention = model.forward(features, tokens)
    assert logits.shape == (5, 11, model.tokenizer.size) and attention.shape == (5, 11, 49)
    np.testing.assert_allclose(tf.reduce_sum(attention, -1), 1.0, atol=1e-5)


def test_decoder_is_causal(model):
    features = tf.random.normal([2, 49, 576])
    tokens = np.random.default_rng(0).integers(4, model.tokenizer.size, (2, 8))
    changed = tokens.copy()
    changed[:, 5:] = 4
    a, b = model((features, tokens)).numpy(), model((features, changed)).numpy()
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_output_bias_is_log_frequency_and_banned_tokens_never_win(model):
    tok = model.tokenizer
    counts = tok.token_counts(CAPTIONS)
    bias = model.output_layer.dense.bias.numpy()
    a, red = tok.id("a"), tok.id("red")
    np.testing.assert_allclose(bias[a] - bias[red], np.log(counts[a] / counts[red]), rtol=1e-5)
    logits = model((tf.random.normal([4, 49, 576]), tf.ones([4, 6], tf.int64))).numpy()
    assert not np.isin(logits.argmax(-1), [tok.id(t) for t in BANNED]).any()
    assert (logits[..., [tok.id(t) for t in BANNED]] < -1e8).all()
