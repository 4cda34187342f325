"""Feature sets: the shard layout, failures kept as records, resuming, and the streaming input over them."""

import json

import numpy as np
import pytest

from captioning.errors import CaptioningError
from captioning.featureset import FeaturesConfig, FeatureSet, extract_features
from captioning.text import Tokenizer
from captioning.training.data import StreamingInput, shuffled, steps_per_epoch


def quiet(_):
    pass


def test_every_row_is_a_feature_or_a_failure_record_and_a_rerun_redoes_only_uncommitted_shards(
        synthetic_data, tmp_path):
    good = synthetic_data["val"].read_text().splitlines()[:9]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    lines = good + [json.dumps({"image": str(tmp_path / "broken.jpg"), "caption": ["x"]}), "{oops"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines).replace('"images/', f'"{synthetic_data["val"].parent}/images/') + "\n")
    config = FeaturesConfig.reading_own_kind(str(manifest), str(tmp_path / "fs"), weights="none", shard_size=4)
    summary = extract_features(config, log=quiet, progress=False)
    assert summary["rows"] == 11 and summary["images"] == 9 and summary["shards"] == 3
    features = FeatureSet(str(tmp_path / "fs"))
    records = [r for shard in features.shards for r in features.records(shard.name)]
    assert [r["row"] for r in records] == list(range(1, 12))  # every row once, in order (JSONL lines count from 1)
    assert {r["status"] for r in features.failures()} == {"not_an_image", "bad_row"}
    for shard in features.shards:
        array = features.features(shard.name)
        assert array.dtype == np.float16 and array.shape == (shard.images, 49, 576)
    assert features.pairs == sum(len(r["captions"]) for r in records if r["offset"] is not None)

    # A run killed after its first shard: the rerun computes the missing shards only, with the same backbone.
    (tmp_path / "fs" / "_committed" / "shard-00002.json").unlink()
    (tmp_path / "fs" / "_SUCCESS.json").unlink()
    logs = []
    again = extract_features(config, log=logs.append, progress=False)
    assert again["images"] == 9
    before = json.loads((tmp_path / "fs" / "backbone.json").read_text())
    assert FeatureSet(str(tmp_path / "fs")).backbone == before

    # Another backbone never joins this feature set.
    with pytest.raises(CaptioningError, match=r"holds features of mobilenet_v3_small \(none, backbone seed 0\); "
                       "use a new --output"):
        extract_features(FeaturesConfig.reading_own_kind(str(manifest), str(tmp_path / "fs"), weights="none", seed=5,
                                                         shard_size=4), log=quiet, progress=False)


def test_a_local_manifest_reads_its_own_files_but_not_s3_rows_unless_told():
    local = FeaturesConfig.reading_own_kind("/data/m.csv", "/out")
    remote = FeaturesConfig.reading_own_kind("s3://b/m.csv", "s3://b/out")
    assert (local.allow_local_files, local.allow_s3_sources) == (True, False)
    assert (remote.allow_local_files, remote.allow_s3_sources) == (False, True)


def test_each_worker_streams_its_own_shards_in_equal_steps(feature_sets):
    import tensorflow as tf

    train_set, val_set = FeatureSet(feature_sets["train"]), FeatureSet(feature_sets["val"])
    tok = Tokenizer.build(train_set.captions(), 100, 20)
    everything = sorted(tok.decode(tok.encode(tf.constant(list(val_set.captions()))).numpy()))
    for split, train in ((train_set, True), (val_set, False)):
        stream = StreamingInput(split, tok, 48, 2, train, seed=3, buffer=64)
        assert stream.steps == (min(stream.pairs) // 24 if train else -(-max(stream.pairs) // 24))
        seen, names = [], []
        for pipeline in range(2):
            names.append([s.name for s in stream.parts[pipeline]])
            batches = list(stream.dataset(pipeline, 24, stream.steps).take(stream.steps))
            assert len(batches) == stream.steps  # one epoch: the same number of steps on every worker
            for (_, tokens, _), labels in batches:
                real = labels.numpy().any(axis=1)  # padding rows have every label masked
                seen.extend(t for t, r in zip(tok.decode(tokens.numpy()), real) if r)
        assert not set(names[0]) & set(names[1])  # no shard, so no pair, on two workers
        if train:
            assert len(seen) == stream.steps * 48
        else:  # validation pads instead: every pair exactly once, though one worker has no shard at all
            assert sorted(seen) == everything


def test_shard_order_and_pairs_are_reshuffled_every_epoch_and_replayable(feature_sets):
    train_set = FeatureSet(feature_sets["train"])
    tok = Tokenizer.build(train_set.captions(), 100, 20)
    stream = StreamingInput(train_set, tok, 24, 1, True, seed=3, buffer=64)
    first = [c for _, c in stream.pairs_of(0, epoch=0)]
    second = [c for _, c in stream.pairs_of(0, epoch=1)]
    assert sorted(first) == sorted(second) and first != second
    assert [c for _, c in stream.pairs_of(0, epoch=0)] == first  # a resumed epoch replays the same order


def test_the_shuffle_buffer_holds_at_most_its_size():
    held, out = [], []

    def items():
        for i in range(1000):
            held.append(i)
            yield (np.zeros(1), str(i))

    for item in shuffled(items(), 50, np.random.default_rng(0)):
        out.append(int(item[1]))
        assert len(held) - len(out) <= 50
    assert sorted(out) == list(range(1000)) and out != list(range(1000))


def test_too_few_pairs_or_shards_for_the_workers_is_a_clear_error(feature_sets):
    with pytest.raises(CaptioningError, match="smaller --batch-size"):
        steps_per_epoch([40, 10], 32, train=True)
    assert steps_per_epoch([40, 10], 32, train=False) == 2
    train_set = FeatureSet(feature_sets["train"])
    with pytest.raises(CaptioningError, match="smaller --shard-size"):
        StreamingInput(train_set, Tokenizer.build(["a b"], 10, 5), 64, 16, True)
    with pytest.raises(CaptioningError, match="does not split evenly"):
        StreamingInput(train_set, Tokenizer.build(["a b"], 10, 5), 63, 2, True)


def test_a_manifest_beside_a_feature_set_is_embedded_with_that_feature_sets_backbone(
        feature_sets, synthetic_data, tmp_path):
    from captioning.train import prepare
    from tests.conftest import tiny_config

    # The default --weights (imagenet) is never downloaded: the training features' own backbone is used.
    config = tiny_config(weights="imagenet", seed=99)
    prepared = prepare(feature_sets["train"], synthetic_data["val"], config, feature_root=tmp_path,
                       log=lambda _: None, progress=False)
    made = FeatureSet(prepared.val)
    assert made.location.startswith(str(tmp_path))
    assert made.backbone["fingerprint"] == FeatureSet(feature_sets["train"]).backbone["fingerprint"]
    assert made.pairs == FeatureSet(feature_sets["val"]).pairs
