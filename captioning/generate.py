"""The one entry point for caption generation: greedy, temperature sampling and beam search, batched."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from einops import rearrange, repeat

from captioning.config import GenerationConfig
from captioning.model import Captioner, DecodeState

@dataclass
class Generation:
    """Per image: caption, length-normalised log-probability, attention (words, 7, 7) when asked for."""

    captions: list[str]
    scores: np.ndarray
    tokens: np.ndarray  # (B, steps), 0-padded after [END]
    attention: list[np.ndarray] | None
    alternatives: list[list[tuple[str, float]]] | None = None  # beam top-k, best first


class Generator:
    """Compiled generation for one model and config; reuse it so the graph is traced once."""

    def __init__(self, model: Captioner, config: GenerationConfig | None = None) -> None:
        self.model = model
        self.config = config or GenerationConfig()
        self.steps = model.config.max_length - 1
        self.traces = 0  # how often the loop was traced; a test and the benchmark check it stays at 1
        loop = self._beam_loop if self.config.method == "beam" else self._sample_loop
        jit = self.config.jit_compile
        if jit is None:
            jit = bool(tf.config.list_physical_devices("GPU"))
        # Batch and grid dimensions are left open in the signature so no batch size retraces the graph.
        spec = tf.TensorSpec([None, None, model.feature_channels], tf.float32)
        self._loop = tf.function(loop, input_signature=[spec], jit_compile=jit)

    def __call__(self, features: np.ndarray | tf.Tensor) -> Generation:
        """Features (B, 49, C) -> captions for the B images."""
        features = tf.convert_to_tensor(features, tf.float32)
        if self.config.method == "beam":
            return self._finish_beam(*[t.numpy() for t in self._loop(features)])
        tokens, scores, attention = (t.numpy() for t in self._loop(features))
        return self._finish(tokens, scores, attention)

    def _choose(self, logits: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        if self.config.method == "greedy":
            return tf.argmax(logits, axis=-1)
        seed = tf.stack([tf.constant(self.config.seed, tf.int32), tf.cast(t, tf.int32)])
        return tf.random.stateless_categorical(logits / self.config.temperature, 1, seed)[:, 0]

    def _sample_loop(self, features: tf.Tensor):
        self.traces += 1
        model, end, steps = self.model, self.model.end_id, self.steps
        batch = tf.shape(features)[0]
        state = model.start(features)
        token = tf.fill([batch], tf.constant(model.start_id, tf.int64))
        done = tf.zeros([batch], tf.bool)
        total = tf.zeros([batch], tf.float32)
        # Outputs are preallocated and written with one-hot masks: fixed shapes keep the loop XLA-friendly.
        tokens = tf.zeros([batch, steps], tf.int64)
        maps = tf.zeros([batch, steps, tf.shape(features)[1] if self.config.attention else 0])
        for t in tf.range(steps):
            logits, attention, state = model.step(token, t, state)
            token = tf.where(done, tf.zeros_like(token), self._choose(logits, t))
            logp = tf.gather(tf.nn.log_softmax(logits), token, batch_dims=1)
            total += tf.where(done, 0.0, logp)
            slot = tf.one_hot(t, steps, dtype=tf.int64)[tf.newaxis]  # (1, steps)
            tokens += slot * token[:, tf.newaxis]
            if self.config.attention:
                live = tf.where(done, 0.0, 1.0)[:, tf.newaxis, tf.newaxis]
                maps += tf.cast(slot, tf.float32)[..., tf.newaxis] * live * attention[:, tf.newaxis]
            done = done | (token == end)
            if tf.reduce_all(done):
                break
        length = tf.reduce_sum(tf.cast(tokens != 0, tf.float32), axis=1)
        return tokens, total / tf.maximum(length, 1.0), maps

    def _beam_loop(self, features: tf.Tensor):
        self.traces += 1
        model, end, k = self.model, self.model.end_id, self.config.beam_size
        batch, steps, vocab = tf.shape(features)[0], self.steps, model.tokenizer.size
        state = model.start(repeat(features, "b s c -> (b k) s c", k=k))
        token = tf.fill([batch * k], tf.constant(model.start_id, tf.int64))
        # Only the first beam is live at the start, so the K beams do not all pick the same word.
        scores = tf.concat([tf.zeros([batch, 1]), tf.fill([batch, k - 1], -1e9)], axis=1)  # (B, K)
        finished = tf.zeros([batch, k], tf.bool)
        lengths = tf.zeros([batch, k])
        history = tf.zeros([batch, k, steps], tf.int64)
        grid = tf.shape(features)[1] if self.config.attention else 0
        maps = tf.zeros([batch, k, steps, grid])
        pad_only = tf.where(tf.range(vocab) == 0, 0.0, -1e9)  # a finished beam may only add padding
        for t in tf.range(steps):
            logits, attention, state = model.step(token, t, state)
            logp = rearrange(tf.nn.log_softmax(logits), "(b k) v -> b k v", k=k)
            logp = tf.where(finished[..., tf.newaxis], pad_only, logp)
            best, index = tf.math.top_k(rearrange(scores[..., tf.newaxis] + logp, "b k v -> b (k v)"), k)
            parent, word = index // vocab, tf.cast(index % vocab, tf.int64)  # (B, K)
            history = tf.gather(history, parent, batch_dims=1)
            finished = tf.gather(finished, parent, batch_dims=1)
            lengths = tf.gather(lengths, parent, batch_dims=1) + tf.cast(~finished, tf.float32)
            slot = tf.one_hot(t, steps, dtype=tf.int64)
            history += slot * word[..., tf.newaxis]
            if self.config.attention:
                attention = tf.gather(rearrange(attention, "(b k) s -> b k s", k=k), parent, batch_dims=1)
                maps = tf.gather(maps, parent, batch_dims=1)
                maps += tf.cast(slot, tf.float32)[:, tf.newaxis] * tf.where(finished, 0.0, 1.0)[..., tf.newaxis, tf.newaxis] * attention[:, :, tf.newaxis]
            state = DecodeState(
                tuple(tuple(_reorder(c, parent, k) for c in kv) for kv in state.self_kv), state.image_kv)
            finished = finished | (word == end)
            scores = best
            token = rearrange(word, "b k -> (b k)")
            if tf.reduce_all(finished):
                break
        normalised = scores / tf.maximum(lengths, 1.0) ** self.config.length_penalty
        order = tf.argsort(normalised, axis=1, direction="DESCENDING")
        return (tf.gather(history, order, batch_dims=1), tf.gather(normalised, order, batch_dims=1),
                tf.gather(maps, order, batch_dims=1))

    def _finish(self, tokens: np.ndarray, scores: np.ndarray, attention: np.ndarray) -> Generation:
        captions = self.model.tokenizer.decode(tokens)
        maps = None
        if self.config.attention:
            maps = [_word_maps(attention[i], tokens[i], self.model.end_id) for i in range(len(tokens))]
        return Generation(captions, scores, tokens, maps)

    def _finish_beam(self, history: np.ndarray, scores: np.ndarray, attention: np.ndarray) -> Generation:
        best = self._finish(history[:, 0], scores[:, 0], attention[:, 0] if self.config.attention else attention)
        decode = self.model.tokenizer.decode
        best.alternatives = [
            list(zip(decode(history[i, : self.config.top_k]), scores[i, : self.config.top_k].tolist()))
            for i in range(len(history))
        ]
        return best


def _reorder(cache: tf.Tensor, parent: tf.Tensor, k: int) -> tf.Tensor:
    """Reorder a (B*K, ...) cache so each beam carries its parent's history."""
    beams = tf.reshape(cache, tf.concat([[-1, k], tf.shape(cache)[1:]], 0))
    return tf.reshape(tf.gather(beams, parent, batch_dims=1), tf.shape(cache))


def _word_maps(attention: np.ndarray, tokens: np.ndarray, end_id: int) -> np.ndarray:
    """Attention rows of the caption's words (up to, not including, [END]) as (words, 7, 7)."""
    words = 0
    while words < len(tokens) and tokens[words] not in (0, end_id):
        words += 1
    side = int(round(attention.shape[-1] ** 0.5))
    return rearrange(attention[:words], "w (h x) -> w h x", h=side, x=side)


def generate(model: Captioner, features: np.ndarray | tf.Tensor, config: GenerationConfig | None = None) -> Generation:
    """Caption a batch of feature maps (B, 49, C); builds a Generator (keep one to avoid retracing)."""
    return Generator(model, config)(features)
