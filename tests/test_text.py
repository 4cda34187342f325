import numpy as np
import pytest
import tensorflow as tf

from captioning.text import END, RESERVED, START, Tokenizer, clean_text, standardize


def test_standardize_lowercases_strips_punctuation_and_wraps():
    out = standardize(tf.constant(["A Large, RED circle!", "  Café — au   lait?  "])).numpy().tolist()
    assert out == [b"[START] a large red circle [END]", b"[START] cafe au lait [END]"]


def test_clean_text_has_no_markers():
    assert clean_text(["Two SHAPES: a star."]) == ["two shapes a star"]


def test_vocabulary_is_frequency_ordered_and_capped():
    tok = Tokenizer.build(["b b b a a c", "b a d"], max_tokens=6, max_length=10)
    assert tok.vocabulary[: len(RESERVED)] == list(RESERVED)
    assert tok.vocabulary[4:] == ["b", "a"]  # capped at 6 ids; most frequent first
    assert tok.size == 6


def test_encode_decode_round_trip_and_unknown_words():
    tok = Tokenizer.build(["a red circle", "a blue square"], max_tokens=100, max_length=8)
    ids = tok.encode(tf.constant(["A red square!", "a green circle"])).numpy()
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.id(START) and tok.id(END) in ids[0]
    assert tok.decode(ids) == ["a red square", "a circle"]  # "green" is [UNK], left out of the text
    assert ids[1, 2] == tok.id("[UNK]")


def test_encode_truncates_to_max_length():
    tok = Tokenizer.build(["one two three four five six"], max_tokens=100, max_length=4)
    ids = tok.encode(tf.constant(["one two three four five six"])).numpy()
    assert ids.shape == (1, 4) and tok.decode(ids) == ["one two three"]


def test_decode_stops_at_end():
    tok = Tokenizer.build(["a b"], max_tokens=100, max_length=6)
    assert tok.decode(np.array([[tok.id("a"), tok.id(END), tok.id("b")]])) == ["a"]


def test_save_load(tmp_path):
    tok = Tokenizer.build(["x y z", "x y"], max_tokens=100, max_length=7)
    tok.save(tmp_path / "v.json")
    back = Tokenizer.load(tmp_path / "v.json")
    assert back.vocabulary == tok.vocabulary and back.max_length == 7


def test_token_counts_ignore_padding():
    tok = Tokenizer.build(["a a b"], max_tokens=100, max_length=8)
    counts = tok.token_counts(["a a b", "a"])
    assert counts[0] == 0
    assert counts[tok.id("a")] == 3 and counts[tok.id("b")] == 1 and counts[tok.id(START)] == 2


def test_rejects_vocabulary_without_reserved_tokens():
    with pytest.raises(ValueError):
        Tokenizer(["a", "b"], 5)
