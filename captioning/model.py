"""The captioner: a Transformer decoder attending over 49 image positions of frozen backbone features."""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from einops import rearrange

from captioning.config import ModelConfig
from captioning.text import END, PAD, START, UNK, Tokenizer

BANNED = (PAD, UNK, START)  # never generated


class SeqEmbedding(keras.layers.Layer):
    """Token embedding plus learned position embedding."""

    def __init__(self, vocab_size: int, max_length: int, d_model: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.token = keras.layers.Embedding(vocab_size, d_model, dtype=self.dtype_policy)
        self.position = keras.layers.Embedding(max_length, d_model, dtype=self.dtype_policy)

    def call(self, tokens: tf.Tensor, start: tf.Tensor | int = 0) -> tf.Tensor:
        # tokens: (B, T) -> (B, T, D). Positions broadcast over the batch (the tutorial's Add does not).
        length = tokens.shape[1] if tokens.shape[1] is not None else tf.shape(tokens)[1]
        positions = start + tf.range(length)  # a static range, so XLA can compile the decoding loop
        return self.token(tokens) + self.position(positions)[tf.newaxis]


class Attention(keras.layers.Layer):
    """Multi-head scaled dot-product attention that also returns its weights."""

    def __init__(self, num_heads: int, key_dim: int, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_heads, self.key_dim = num_heads, key_dim
        width = num_heads * key_dim
        self.query = keras.layers.Dense(width, dtype=self.dtype_policy)
        self.key = keras.layers.Dense(width, dtype=self.dtype_policy)
        self.value = keras.layers.Dense(width, dtype=self.dtype_policy)
        self.out = keras.layers.Dense(width, dtype=self.dtype_policy)
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def keys_values(self, context: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(B, S, C) -> keys and values (B, H, S, Dh)."""
        k = rearrange(self.key(context), "b s (h d) -> b h s d", h=self.num_heads)
        v = rearrange(self.value(context), "b s (h d) -> b h s d", h=self.num_heads)
        return k, v

    def attend(
        self, x: tf.Tensor, k: tf.Tensor, v: tf.Tensor, mask: tf.Tensor | None = None, training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Queries from x (B, T, D) over k, v (B, H, S, Dh) -> output (B, T, D), weights (B, H, T, S)."""
        q = rearrange(self.query(x), "b t (h d) -> b h t d", h=self.num_heads)
        # Softmax in float32 so masked logits and mixed precision do not overflow.
        logits = tf.cast(tf.einsum("bhtd,bhsd->bhts", q, k), tf.float32) * (self.key_dim**-0.5)
        if mask is not None:
            logits = tf.where(mask, logits, -1e9)
        weights = tf.nn.softmax(logits, axis=-1)
        mixed = tf.einsum("bhts,bhsd->bhtd", tf.cast(self.dropout(weights, training=training), v.dtype), v)
        return self.out(rearrange(mixed, "b h t d -> b t (h d)")), weights

    def call(self, x: tf.Tensor, context: tf.Tensor, mask: tf.Tensor | None = None, training: bool = False):
        k, v = self.keys_values(context)
        return self.attend(x, k, v, mask, training)


class CausalSelfAttention(keras.layers.Layer):
    """Each position attends to itself and earlier positions; residual + LayerNorm."""

    def __init__(self, num_heads: int, d_model: int, dropout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attention = Attention(num_heads, d_model // num_heads, dropout, dtype=self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        # x: (B, T, D)
        t = tf.shape(x)[1]
        causal = tf.linalg.band_part(tf.ones([t, t], tf.bool), -1, 0)  # (T, T) lower triangle
        out, _ = self.attention(x, x, causal, training=training)
        return self.norm(x + out)

    def step(self, x: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor], t: tf.Tensor):
        """One new position x (B, 1, D) at index t, with keys/values of earlier positions in cache."""
        k_cache, v_cache = cache  # (B, H, Tmax, Dh)
        k_new, v_new = self.attention.keys_values(x)  # (B, H, 1, Dh)
        slot = tf.cast(tf.one_hot(t, tf.shape(k_cache)[2]), k_cache.dtype)[tf.newaxis, tf.newaxis, :, tf.newaxis]
        k_cache = k_cache * (1 - slot) + k_new * slot
        v_cache = v_cache * (1 - slot) + v_new * slot
        visible = tf.range(tf.shape(k_cache)[2]) <= t  # (Tmax,)
        out, _ = self.attention.attend(x, k_cache, v_cache, visible[tf.newaxis, tf.newaxis, tf.newaxis])
        return self.norm(x + out), (k_cache, v_cache)


class CrossAttention(keras.layers.Layer):
    """Text positions attend over the image positions; returns the attention weights too."""

    def __init__(self, num_heads: int, d_model: int, dropout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attention = Attention(num_heads, d_model // num_heads, dropout, dtype=self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)

    def build(self, x_shape: tuple, image_kv_shape: tuple) -> None:
        """Nothing of its own to build: the sublayers build as they are first used (image_kv runs first)."""
        self.built = True

    def call(self, x: tf.Tensor, image_kv: tuple[tf.Tensor, tf.Tensor], training: bool = False):
        # x: (B, T, D), image keys/values (B, H, 49, Dh) each -> (B, T, D), weights (B, H, T, 49)
        out, weights = self.attention.attend(x, *image_kv, training=training)
        return self.norm(x + out), weights

    def image_kv(self, image: tf.Tensor, index: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Keys/values of each image (U, 49, C) once, then gathered for its captions: index (B,) -> (B, H, 49, Dh)."""
        k, v = self.attention.keys_values(image)
        if index is None:
            return k, v
        return tf.gather(k, index), tf.gather(v, index)

    def step(self, x: tf.Tensor, image_kv: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Like call, for decoding (no dropout)."""
        out, weights = self.attention.attend(x, *image_kv)
        return self.norm(x + out), weights


class FeedForward(keras.layers.Layer):
    """Position-wise MLP with dropout; residual + LayerNorm."""

    def __init__(self, d_model: int, multiplier: int, dropout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(multiplier * d_model, activation="relu", dtype=self.dtype_policy)
        self.project = keras.layers.Dense(d_model, dtype=self.dtype_policy)
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.norm(x + self.dropout(self.project(self.hidden(x)), training=training))


class DecoderLayer(keras.layers.Layer):
    """Causal self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, config: ModelConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        d, h, p = config.d_model, config.num_heads, config.dropout
        self.self_attention = CausalSelfAttention(h, d, p, dtype=self.dtype_policy)
        self.cross_attention = CrossAttention(h, d, p, dtype=self.dtype_policy)
        self.feed_forward = FeedForward(d, config.ff_multiplier, p, dtype=self.dtype_policy)

    def call(self, x: tf.Tensor, image_kv: tuple[tf.Tensor, tf.Tensor], training: bool = False):
        # x: (B, T, D), this layer's image keys/values (B, H, 49, Dh) -> (B, T, D), weights (B, H, T, 49)
        x = self.self_attention(x, training=training)
        x, weights = self.cross_attention(x, image_kv, training=training)
        return self.feed_forward(x, training=training), weights

    def step(self, x: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor], image_kv, t: tf.Tensor):
        """Incremental form of call for one new position."""
        x, cache = self.self_attention.step(x, cache, t)
        x, weights = self.cross_attention.step(x, image_kv)
        return self.feed_forward(x), cache, weights


class TokenOutput(keras.layers.Layer):
    """Logits over the vocabulary; bias starts at log token frequency, banned tokens never win."""

    def __init__(self, vocab_size: int, banned_ids: list[int], bias: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        init = keras.initializers.Constant(bias) if bias is not None else "zeros"
        self.dense = keras.layers.Dense(vocab_size, bias_initializer=init, dtype=self.dtype_policy)
        banned = np.zeros(vocab_size, np.float32)
        banned[banned_ids] = -1e9
        self.banned = tf.constant(banned)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.dense(x), tf.float32) + self.banned  # (B, T, V) float32


def output_bias(counts: np.ndarray, banned_ids: list[int]) -> np.ndarray:
    """Log unigram frequencies: the untrained model already predicts the word distribution."""
    counts = counts.astype(np.float64).copy()
    counts[banned_ids] = 0
    total = counts.sum()
    probs = np.where(counts > 0, counts / max(total, 1), 1.0)
    return np.where(counts > 0, np.log(probs), -1e9).astype(np.float32)


class DecodeState(NamedTuple):
    """Per-layer caches for incremental decoding."""

    self_kv: tuple  # per layer (k, v), each (B, H, Tmax, Dh)
    image_kv: tuple  # per layer (k, v), each (B, H, 49, Dh)


class Captioner(keras.Model):
    """Image features (U, 49, C), caption prefixes (B, T) and, optionally, each caption's image row (B,) ->
    next-token logits (B, T, V). Without the index, features are one row per caption (U = B)."""

    def __init__(
        self, config: ModelConfig, tokenizer: Tokenizer, bias: np.ndarray | None = None,
        dtype: str | None = None, **kwargs,
    ) -> None:
        super().__init__(dtype=dtype, **kwargs)
        self.config = config
        self.tokenizer = tokenizer
        self.start_id, self.end_id = tokenizer.id(START), tokenizer.id(END)
        policy = self.dtype_policy
        # Backbones differ wildly in feature scale (a random MobileNetV3 gives std ~0.06, ImageNet weights
        # ~1); normalising each position's features makes cross-attention start from comparable logits.
        self.image_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy)
        self.embedding = SeqEmbedding(tokenizer.size, config.max_length, config.d_model, dtype=policy)
        self.decoder_layers = [DecoderLayer(config, dtype=policy) for _ in range(config.num_layers)]
        banned = [tokenizer.id(t) for t in BANNED]
        self.output_layer = TokenOutput(tokenizer.size, banned, bias, dtype=policy)

    def call(self, inputs: tuple[tf.Tensor, ...], training: bool = False) -> tf.Tensor:
        logits, _ = self.forward(*inputs, training=training)
        return logits

    def forward(self, features: tf.Tensor, tokens: tf.Tensor, index: tf.Tensor | None = None,
                training: bool = False):
        """Full-sequence pass -> logits (B, T, V) and attention (B, T, 49) averaged over heads and layers.

        The image work (normalisation, each layer's key/value projection) runs once per row of features and is
        gathered for the captions by index: 4-5 captions sharing an image pay for it once."""
        image = self.image_norm(tf.cast(features, self.compute_dtype))  # (U, 49, C)
        x = self.embedding(tokens)  # (B, T, D)
        maps = []
        for layer in self.decoder_layers:
            x, weights = layer(x, layer.cross_attention.image_kv(image, index), training=training)
            maps.append(tf.reduce_mean(weights, axis=1))  # (B, T, 49)
        return self.output_layer(x), tf.add_n(maps) / len(maps)

    @property
    def feature_channels(self) -> int:
        """C of the (B, 49, C) features the model was built for."""
        return int(self.image_norm.gamma.shape[-1])

    def build_for(self, channels: int) -> None:
        """Create all weights by running one dummy batch (needed before load_weights)."""
        self((tf.zeros([1, 49, channels]), tf.zeros([1, self.config.max_length - 1], tf.int64)))

    def start(self, features: tf.Tensor, batch_max_length: int | None = None) -> DecodeState:
        """Caches for decoding: image keys/values computed once, empty self-attention slots."""
        image = self.image_norm(tf.cast(features, self.compute_dtype))
        length = batch_max_length or self.config.max_length
        batch = tf.shape(image)[0]
        heads, head_dim = self.config.num_heads, self.config.d_model // self.config.num_heads
        empty = tf.zeros([batch, heads, length, head_dim], self.compute_dtype)
        image_kv = tuple(layer.cross_attention.image_kv(image) for layer in self.decoder_layers)
        return DecodeState(tuple((empty, empty) for _ in self.decoder_layers), image_kv)

    def step(self, tokens: tf.Tensor, t: tf.Tensor, state: DecodeState):
        """Token ids (B,) at position t -> logits (B, V), attention (B, 49), new state."""
        x = self.embedding(tokens[:, tf.newaxis], start=t)  # (B, 1, D)
        caches, maps = [], []
        for layer, cache, image_kv in zip(self.decoder_layers, state.self_kv, state.image_kv):
            x, cache, weights = layer.step(x, cache, image_kv, t)
            caches.append(cache)
            maps.append(tf.reduce_mean(weights[:, :, 0], axis=1))  # (B, 49)
        logits = self.output_layer(x)[:, 0]
        return logits, tf.add_n(maps) / len(maps), DecodeState(tuple(caches), state.image_kv)
