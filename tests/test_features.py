import numpy as np
import pytest

from captioning.errors import CaptioningError
from captioning.features import Backbone, FeatureCache


@pytest.fixture(scope="module")
def backbone():
    return Backbone("mobilenet_v3_small", "none", seed=0)


def test_shape_is_49_positions_of_576(backbone):
    images = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    features = backbone(images).numpy()
    assert features.shape == (3, 49, 576)
    assert features.std() > 1e-3  # the He re-initialisation keeps features from vanishing
    assert not np.allclose(features[0], features[1])


def test_random_backbone_is_reproducible_from_its_seed(backbone):
    assert Backbone("mobilenet_v3_small", "none", seed=0).fingerprint() == backbone.fingerprint()
    assert Backbone("mobilenet_v3_small", "none", seed=1).fingerprint() != backbone.fingerprint()


def test_local_weights_file(backbone, tmp_path):
    backbone.save(tmp_path / "mnv3.weights.h5")
    loaded = Backbone("mobilenet_v3_small", str(tmp_path / "mnv3.weights.h5"))
    assert loaded.fingerprint() == backbone.fingerprint()
    with pytest.raises(CaptioningError, match="nowhere.h5: backbone weights file not found"):
        Backbone("mobilenet_v3_small", str(tmp_path / "nowhere.h5"))
    (tmp_path / "junk.weights.h5").write_bytes(b"junk")
    with pytest.raises(CaptioningError, match="junk.weights.h5: cannot load backbone weights"):
        Backbone("mobilenet_v3_small", str(tmp_path / "junk.weights.h5"))


def test_unknown_backbone():
    with pytest.raises(CaptioningError, match="resnet9000: unknown backbone"):
        Backbone("resnet9000")


def test_cache_fills_once_and_survives_restart(backbone, tmp_path):
    rng = np.random.default_rng(1)
    images = {f"k{i}": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for i in range(5)}
    loads = []

    def load(source):
        loads.append(source)
        if source == "bad":
            raise CaptioningError("bad", "not an image", "not_an_image")
        return images[source]

    cache = FeatureCache(tmp_path, backbone, shard_size=2)
    errors = cache.fill([(k, k) for k in images] + [("kbad", "bad")], load, batch_size=2, progress=False)
    assert set(errors) == {"kbad"} and len(cache) == 5
    direct = backbone(np.stack([images["k3"]])).numpy()[0]
    np.testing.assert_allclose(cache.get("k3").astype(np.float32), direct, atol=2e-3, rtol=1e-2)
    assert len(list(cache.dir.glob("shard-*.npy"))) == 3  # 5 images in shards of 2

    loads.clear()
    again = FeatureCache(tmp_path, backbone, shard_size=2)
    assert len(again) == 5
    again.fill([(k, k) for k in images], load, progress=False)
    assert loads == []  # nothing recomputed
    np.testing.assert_array_equal(again.get("k3"), cache.get("k3"))


def test_cache_is_per_backbone_weights(backbone, tmp_path):
    other = Backbone("mobilenet_v3_small", "none", seed=5)
    assert FeatureCache(tmp_path, backbone).dir != FeatureCache(tmp_path, other).dir
