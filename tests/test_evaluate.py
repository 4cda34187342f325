import shutil

import pytest

from captioning.bundle import load_bundle
from captioning.evaluate import corpus_scores, evaluate
from captioning.manifest import read_manifest

REFS = {"1": ["a red circle left of a blue square", "a blue square right of a red circle"],
        "2": ["a large green star", "one green star"]}


def test_perfect_partial_and_wrong_are_ordered():
    perfect = corpus_scores(REFS, {"1": "A red circle, left of a blue square!", "2": "one green star"}, meteor=False)
    partial = corpus_scores(REFS, {"1": "a red circle", "2": "a green star"}, meteor=False)
    wrong = corpus_scores(REFS, {"1": "two yellow triangles", "2": "nothing here at all"}, meteor=False)
    assert perfect["bleu4"] > 0.99 and perfect["bleu1"] > 0.99  # cleaning makes case and punctuation moot
    assert perfect["cider"] > partial["cider"] > wrong["cider"]
    assert perfect["bleu1"] > partial["bleu1"] > wrong["bleu1"]
    assert perfect["images"] == 2 and perfect["meteor"] is None


def test_bleu_matches_a_hand_computed_value():
    # One image, hypothesis "a red circle" against reference "a red circle on a light background":
    # every n-gram precision is 1, so BLEU is the brevity penalty exp(1 - 7/3) for all n.
    import math

    scores = corpus_scores({"x": ["a red circle on a light background"]}, {"x": "a red circle"}, meteor=False)
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 7 / 3), rel=1e-4)
    assert scores["bleu3"] == pytest.approx(math.exp(1 - 7 / 3), rel=1e-4)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs a Java runtime")
def test_meteor_when_java_is_there():
    scores = corpus_scores(REFS, {"1": "a red circle left of a blue square", "2": "a green star"})
    assert 0.3 < scores["meteor"] <= 1.0


def test_nothing_to_score():
    with pytest.raises(ValueError, match="nothing to score"):
        corpus_scores(REFS, {"3": "x"}, meteor=False)


def test_evaluate_lists_failures_and_scores_the_rest(trained_bundle, synthetic_data, tmp_path):
    lines = synthetic_data["test"].read_text().splitlines()[:10]
    folder = synthetic_data["test"].parent
    (tmp_path / "bad.jpg").write_text("nope")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines).replace('"images/', f'"{folder}/images/') + "\n"
                        + f'{{"image": "{tmp_path}/bad.jpg", "caption": "x"}}\n')
    report = evaluate(load_bundle(trained_bundle), read_manifest(manifest), meteor=False, log=lambda _: None)
    assert report["scores"]["images"] == 10 and len(report["captions"]) == 10
    assert [f["image"] for f in report["failures"]] == [f"{tmp_path}/bad.jpg"]
    assert 0 < report["scores"]["bleu1"] <= 1


def test_reference_words_outside_the_vocabulary_are_counted_as_what_no_caption_can_match():
    from captioning.evaluate import format_scores, reference_oov

    vocabulary = ["", "[UNK]", "[START]", "[END]", "a", "red", "circle"]
    assert reference_oov(["A red circle!", "a red zebra"], vocabulary) == pytest.approx(1 / 6)
    scores = {"bleu1": 1, "bleu2": 1, "bleu3": 1, "bleu4": 1, "cider": 1, "meteor": None, "images": 2,
              "reference_oov": 1 / 6}
    assert format_scores(scores).endswith("on 2 images; 16.7% of reference words out of vocabulary")
