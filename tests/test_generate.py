import numpy as np
import pytest
import tensorflow as tf

from captioning.bundle import load_bundle
from captioning.generate import GenerationConfig, Generator


@pytest.fixture(scope="module")
def bundle(trained_bundle):
    return load_bundle(trained_bundle)


@pytest.fixture(scope="module")
def features(bundle):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (24, 224, 224, 3), dtype=np.uint8)
    return bundle.backbone(images).numpy()


def full_recompute_greedy(model, features):
    """The design's simple_gen: rerun the whole decoder over the whole prefix for every word."""
    tokens = np.full((len(features), 1), model.start_id)
    done = np.zeros(len(features), bool)
    for _ in range(model.config.max_length - 1):
        nxt = model((features, tf.constant(tokens))).numpy()[:, -1].argmax(-1)
        nxt[done] = 0
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        done |= nxt == model.end_id
        if done.all():
            break
    return tokens[:, 1:]


def test_incremental_greedy_equals_full_recompute(bundle, features):
    fast = Generator(bundle.model, GenerationConfig("greedy", attention=False))(features)
    slow = full_recompute_greedy(bundle.model, features)
    assert fast.captions == bundle.model.tokenizer.decode(slow)
    width = min(fast.tokens.shape[1], slow.shape[1])
    np.testing.assert_array_equal(fast.tokens[:, :width], slow[:, :width])


def test_attention_maps_per_word(bundle, features):
    out = Generator(bundle.model, GenerationConfig("greedy"))(features[:6])
    for caption, maps in zip(out.captions, out.attention):
        assert maps.shape == (len(caption.split()), 7, 7)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert Generator(bundle.model, GenerationConfig("greedy", attention=False))(features[:2]).attention is None


def test_beam_of_one_is_greedy_and_beams_are_ranked(bundle, features):
    greedy = Generator(bundle.model, GenerationConfig("greedy", attention=False))(features)
    beam1 = Generator(bundle.model, GenerationConfig("beam", beam_size=1, attention=False))(features)
    assert beam1.captions == greedy.captions
    np.testing.assert_allclose(beam1.scores, greedy.scores, atol=1e-4)
    beam = Generator(bundle.model, GenerationConfig("beam", beam_size=4, top_k=4))(features)
    for alternatives, best, maps in zip(beam.alternatives, beam.captions, beam.attention):
        scores = [s for _, s in alternatives]
        assert scores == sorted(scores, reverse=True) and alternatives[0][0] == best
        assert maps.shape[0] == len(best.split())
    # Each hypothesis' score is its mean token log-probability under the full (non-cached) model.
    for caption, score in beam.alternatives[0] + beam.alternatives[1]:
        image = 0 if (caption, score) in beam.alternatives[0] else 1
        np.testing.assert_allclose(teacher_forced_score(bundle.model, features[image], caption), score, atol=1e-3)


def teacher_forced_score(model, features, caption):
    ids = model.tokenizer.encode(tf.constant([caption])).numpy()[0]
    length = int((ids != 0).sum())
    logits = model((features[None], tf.constant(ids[None, : length - 1]))).numpy()[0]
    logp = tf.nn.log_softmax(logits).numpy()
    return float(np.mean([logp[t, ids[t + 1]] for t in range(length - 1)]))


def test_sampling_is_seeded_and_cold_sampling_is_greedy(bundle, features):
    hot = [Generator(bundle.model, GenerationConfig("sample", temperature=1.5, seed=s))(features).captions
           for s in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]
    cold = Generator(bundle.model, GenerationConfig("sample", temperature=1e-4))(features)
    greedy = Generator(bundle.model, GenerationConfig("greedy"))(features)
    assert cold.captions == greedy.captions


def test_batch_of_one_equals_batch_of_many(bundle, features):
    gen = Generator(bundle.model, GenerationConfig("beam", beam_size=3, attention=False))
    together = gen(features[:5]).captions
    alone = [gen(features[i : i + 1]).captions[0] for i in range(5)]
    assert together == alone


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown generation method"):
        GenerationConfig("topp")
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig("sample", temperature=0)


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_traced_once_whatever_the_batch_size(bundle, features, method):
    generator = Generator(bundle.model, GenerationConfig(method, beam_size=2))
    for size in (1, 3, 8, 5, 24):
        assert len(generator(features[:size]).captions) == size
    assert generator.traces == 1


def test_xla_compiled_loop_matches_the_plain_graph(bundle, features):
    plain = Generator(bundle.model, GenerationConfig("greedy"))(features[:8])
    compiled = Generator(bundle.model, GenerationConfig("greedy", jit_compile=True))(features[:8])
    assert compiled.captions == plain.captions
    for a, b in zip(compiled.attention, plain.attention):
        np.testing.assert_allclose(a, b, atol=1e-4)
    beam = Generator(bundle.model, GenerationConfig("beam", beam_size=3, jit_compile=True))(features[:8])
    assert beam.captions == Generator(bundle.model, GenerationConfig("beam", beam_size=3))(features[:8]).captions


def test_reduced_precision_decoding_runs_and_mostly_agrees(trained_bundle, bundle, features):
    half = load_bundle(trained_bundle, precision="mixed_bfloat16")
    assert half.model.compute_dtype == "bfloat16" and half.model.variable_dtype == "float32"
    low = Generator(half.model, GenerationConfig("greedy"))(features)
    full = Generator(bundle.model, GenerationConfig("greedy"))(features)
    agree = np.mean([a == b for a, b in zip(low.captions, full.captions)])
    assert agree >= 0.7, (agree, low.captions[:3], full.captions[:3])
    assert all(np.isfinite(m).all() for m in low.attention)
