"""Caption tokenizer: standardise, wrap in [START]/[END], map words to ids and back."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from captioning.atomic import atomic_write

PAD, UNK, START, END = "", "[UNK]", "[START]", "[END]"
RESERVED = (PAD, UNK, START, END)


def clean(text: tf.Tensor) -> tf.Tensor:
    """Unicode-normalise, lowercase and strip punctuation; no [START]/[END]."""
    # NFKD splits accents into combining marks, which the punctuation pass then removes: "café" -> "cafe".
    text = tf_text.normalize_utf8(text, "NFKD")
    text = tf.strings.lower(text)
    text = tf.strings.regex_replace(text, r"[^\p{L}\p{N}\s]", "")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(text)


def standardize(text: tf.Tensor) -> tf.Tensor:
    """clean() plus the [START]/[END] markers the decoder is trained on."""
    return tf.strings.join([START, clean(text), END], separator=" ")


def clean_text(captions: Sequence[str]) -> list[str]:
    """clean() for Python strings (used by evaluation to compare like with like)."""
    return [s.decode("utf-8") for s in clean(tf.constant(list(captions), tf.string)).numpy()]


class Tokenizer:
    """Vocabulary of at most max_tokens words; ids 0..3 are '', [UNK], [START], [END]."""

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        if list(vocabulary[: len(RESERVED)]) != list(RESERVED):
            raise ValueError(f"vocabulary must start with {RESERVED}")
        self.vocabulary = list(vocabulary)
        self.max_length = max_length
        self._words = tf.constant(self.vocabulary, tf.string)
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self._words, tf.range(len(self.vocabulary), dtype=tf.int64)),
            default_value=self.vocabulary.index(UNK),
        )
        self._split = tf_text.WhitespaceTokenizer()

    @property
    def size(self) -> int:
        """Number of ids."""
        return len(self.vocabulary)

    def id(self, word: str) -> int:
        """Id of a vocabulary word."""
        return self.vocabulary.index(word)

    @classmethod
    def build(cls, captions: Iterable[str], max_tokens: int, max_length: int) -> "Tokenizer":
        """Vocabulary of the max_tokens most frequent words in the training captions."""
        return cls.build_counted(captions, max_tokens, max_length)[0]

    @classmethod
    def build_counted(cls, captions: Iterable[str], max_tokens: int,
                      max_length: int) -> tuple["Tokenizer", np.ndarray]:
        """build() plus how often each id occurs, from the same single pass over the captions.

        The counts ignore truncation at max_length (they feed the output bias, a prior, not a loss).
        """
        counts = word_counts(captions)
        words = {w: n for w, n in counts.items() if w not in RESERVED}
        # Ties broken alphabetically so the same captions always give the same ids.
        ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = [w for w, _ in ranked[: max(0, max_tokens - len(RESERVED))]]
        tokenizer = cls(list(RESERVED) + kept, max_length)
        ids = np.zeros(tokenizer.size, np.int64)
        for index, word in enumerate(tokenizer.vocabulary):
            ids[index] = counts.get(word, 0)
        ids[tokenizer.id(UNK)] = sum(words.values()) - sum(words[w] for w in kept)
        ids[0] = 0
        return tokenizer, ids

    def encode(self, captions: tf.Tensor) -> tf.Tensor:
        """Strings (B,) -> int64 ids (B, max_length), zero padded, truncated past max_length."""
        words = self._split.tokenize(standardize(captions))
        ids = self._table.lookup(words)
        return ids.to_tensor(default_value=0, shape=[None, self.max_length])

    def decode(self, ids: np.ndarray | tf.Tensor) -> list[str]:
        """Ids (B, T) -> captions, stopping at [END] and leaving out reserved tokens."""
        out = []
        for row in np.asarray(ids):
            words = []
            for i in row:
                word = self.vocabulary[int(i)]
                if word == END:
                    break
                if word not in RESERVED:
                    words.append(word)
            out.append(" ".join(words))
        return out

    def token_counts(self, captions: Iterable[str]) -> np.ndarray:
        """How often each id occurs in the encoded captions (padding excluded)."""
        counts = np.zeros(self.size, np.int64)
        batch: list[str] = []

        def flush(batch: list[str]) -> None:
            if batch:
                ids = self.encode(tf.constant(batch)).numpy()
                counts[:] += np.bincount(ids.ravel(), minlength=self.size)

        for caption in captions:
            batch.append(caption)
            if len(batch) == 4096:
                flush(batch)
                batch = []
        flush(batch)
        counts[0] = 0
        return counts

    def save(self, path: str | Path) -> None:
        """Write the vocabulary and max_length as JSON."""
        atomic_write(path, json.dumps({"max_length": self.max_length, "vocabulary": self.vocabulary}).encode())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read what save() wrote."""
        data = json.loads(Path(path).read_text())
        return cls(data["vocabulary"], int(data["max_length"]))


def word_counts(captions: Iterable[str]) -> collections.Counter[str]:
    """Standardised words (with [START]/[END]) and how often each occurs; captions are read once, in batches."""
    counts: collections.Counter[str] = collections.Counter()
    batch: list[str] = []
    for caption in captions:
        batch.append(caption)
        if len(batch) == 4096:
            counts.update(_words(batch))
            batch = []
    counts.update(_words(batch))
    return counts


def _words(captions: list[str]) -> list[str]:
    if not captions:
        return []
    tokens = tf_text.WhitespaceTokenizer().tokenize(standardize(tf.constant(captions)))
    return [w.decode("utf-8") for w in tokens.flat_values.numpy()]
