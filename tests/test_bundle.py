import json
import pickle
import shutil

import numpy as np
import pytest

from captioning.bundle import load_bundle
from captioning.errors import BundleError
from captioning.generate import GenerationConfig, Generator


def copy(src, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("feature-cache", "checkpoint"))
    return dst


def test_round_trip_without_pickle(trained_bundle, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("a bundle must load without pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    a, b = load_bundle(trained_bundle), load_bundle(trained_bundle)
    images = np.random.default_rng(0).integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
    features = a.backbone(images)
    np.testing.assert_allclose(features, b.backbone(images), atol=1e-6)
    config = GenerationConfig(attention=False)
    assert Generator(a.model, config)(features).captions == Generator(b.model, config)(features).captions
    meta = json.loads((trained_bundle / "bundle.json").read_text())
    assert meta["version"] == a.version and meta["backbone"]["name"] == "mobilenet_v3_small"
    assert {"val_loss", "best_epoch"} <= set(meta["metrics"])


def test_version_changes_with_the_weights(trained_bundle, tmp_path):
    from captioning.bundle import save_bundle

    bundle = load_bundle(trained_bundle)
    weights = bundle.model.output_layer.dense.bias
    weights.assign(weights + 0.5)
    assert save_bundle(tmp_path / "changed", bundle.model, bundle.backbone) != bundle.version


@pytest.mark.parametrize("damage,file,message", [
    (lambda d: (d / "bundle.json").unlink(), "bundle.json", "missing"),
    (lambda d: (d / "bundle.json").write_text("{"), "bundle.json", "corrupt bundle manifest"),
    (lambda d: (d / "vocabulary.json").unlink(), "vocabulary.json", "missing"),
    (lambda d: (d / "decoder.weights.h5").write_bytes((d / "decoder.weights.h5").read_bytes()[:500]),
     "decoder.weights.h5", "cannot load decoder weights"),
    (lambda d: (d / "backbone.weights.h5").unlink(), "backbone.weights.h5", "missing"),
])
def test_damaged_bundle_names_the_file(trained_bundle, tmp_path, damage, file, message):
    bundle = copy(trained_bundle, tmp_path)
    damage(bundle)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert file in str(err.value) and message in str(err.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="model directory not found"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize("edit,message", [
    (lambda m: [], "top level: [] is not of type 'object'"),
    (lambda m: {**m, "backbone": {}}, "backbone: 'name' is a required property"),
    (lambda m: {**m, "model": {**m["model"], "num_layers": "2"}}, "model.num_layers: '2' is not of type 'integer'"),
    (lambda m: {k: v for k, v in m.items() if k != "version"}, "'version' is a required property"),
    (lambda m: {**m, "model": {**m["model"], "d_model": 33}}, "not divisible"),
    (lambda m: {**m, "model": {**m["model"], "extra": 1}}, "Additional properties"),
    (lambda m: {**m, "format_version": 2}, "format_version"),
])
def test_bundle_json_is_checked_against_its_schema(trained_bundle, tmp_path, edit, message):
    bundle = copy(trained_bundle, tmp_path)
    manifest = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert "bundle.json: corrupt bundle manifest" in str(err.value) and message in str(err.value)
