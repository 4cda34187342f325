import numpy as np
import pytest

from captioning.errors import CaptioningError
from captioning.features import Backbone


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
