"""Frozen image backbones (MobileNetV3Small by default) and their identity (describe, from_record)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from einops import rearrange

from captioning.config import BACKBONE_CHANNELS
from captioning.errors import CaptioningError


@dataclass(frozen=True)
class BackboneSpec:
    """A keras.applications model usable as a 7x7 feature extractor."""

    build: Callable[..., keras.Model]
    channels: int


_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    # All of these take 0..255 RGB and normalise inside the model.
    "mobilenet_v3_small": lambda **kw: keras.applications.MobileNetV3Small(include_preprocessing=True, **kw),
    "mobilenet_v3_large": lambda **kw: keras.applications.MobileNetV3Large(include_preprocessing=True, **kw),
    "efficientnet_b0": lambda **kw: keras.applications.EfficientNetB0(**kw),
}
BACKBONES: dict[str, BackboneSpec] = {name: BackboneSpec(_BUILDERS[name], channels)
                                      for name, channels in BACKBONE_CHANNELS.items()}


class Backbone:
    """Frozen feature extractor: uint8 images (B, 224, 224, 3) -> features (B, 49, C)."""

    def __init__(self, name: str, weights: str = "imagenet", seed: int = 0, image_size: int = 224) -> None:
        if name not in BACKBONES:
            raise CaptioningError(name, f"unknown backbone; choose one of {', '.join(BACKBONES)}")
        self.name, self.spec, self.image_size = name, BACKBONES[name], image_size
        self.weights_source = weights
        self.seed: int | None = seed if weights == "none" else None  # only a random backbone has one
        shape = (image_size, image_size, 3)
        if weights == "imagenet":
            try:
                self.model = self.spec.build(input_shape=shape, include_top=False, weights="imagenet")
            except Exception as err:  # Keras raises a bare Exception ("URL fetch failure ...") when offline
                cause = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise CaptioningError(
                    "--weights imagenet", f"cannot download the ImageNet weights of {name} ({cause}); pass "
                    "--weights none for a seeded random backbone, or --weights FILE.weights.h5 with a local copy",
                    "weights_unavailable") from None
        else:
            self.model = self.spec.build(input_shape=shape, include_top=False, weights=None)
            if weights == "none":
                reinitialise(self.model, seed)
            else:
                path = Path(weights)
                if not path.is_file():
                    raise CaptioningError(weights, "backbone weights file not found (expected imagenet, none or a path)")
                try:
                    self.model.load_weights(str(path))
                except Exception as err:  # h5py / keras raise many types for a bad file
                    raise CaptioningError(weights, f"cannot load backbone weights: {err}") from None
        self.model.trainable = False
        # One trace for every batch size: a retrace mid-job costs about a second.
        images = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)
        self._forward = tf.function(self._features, input_signature=[images])

    @property
    def channels(self) -> int:
        """Feature depth C."""
        return self.spec.channels

    def _features(self, images: tf.Tensor) -> tf.Tensor:
        maps = self.model(tf.cast(images, tf.float32), training=False)  # (B, 7, 7, C)
        return rearrange(maps, "b h w c -> b (h w) c")

    def __call__(self, images: np.ndarray | tf.Tensor) -> tf.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, 49, C)."""
        return self._forward(tf.convert_to_tensor(images, tf.uint8))

    def fingerprint(self) -> str:
        """Hash of the weights: a feature cache is only valid for the weights that filled it."""
        digest = hashlib.sha256(self.name.encode())
        for weight in self.model.weights:
            digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the weights (HDF5, no pickle) so a bundle carries the exact backbone it was trained on."""
        self.model.save_weights(str(path))

    def describe(self) -> dict[str, Any]:
        """The backbone's identity, as bundles and feature sets record it beside its weights file."""
        return {"name": self.name, "weights_source": self.weights_source, "seed": self.seed,
                "fingerprint": self.fingerprint(), "channels": self.channels, "image_size": self.image_size}

    @classmethod
    def from_record(cls, record: dict[str, Any], weights_file: str | Path, where: str,
                    error: type[CaptioningError] = CaptioningError, source: str | None = None) -> "Backbone":
        """The recorded backbone from its own weights file, refused (naming `where`) unless the weights are the
        very ones its fingerprint says. source: the weights source it reports (default: the recorded one)."""
        backbone = cls(record["name"], weights=str(weights_file), image_size=record.get("image_size", 224))
        backbone.weights_source = source or record.get("weights_source", str(weights_file))
        backbone.seed = record.get("seed")
        if backbone.fingerprint() != record.get("fingerprint"):
            raise error(where, "backbone weights do not match the recorded fingerprint")
        return backbone


def reinitialise(model: keras.Model, seed: int) -> None:
    """He-normal conv kernels from a seed: Keras' default init makes MobileNetV3 features vanish (~1e-10)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D)):
            kh, kw, cin, _ = layer.kernel.shape
            fan_in = kh * kw * (1 if isinstance(layer, keras.layers.DepthwiseConv2D) else cin)
            layer.kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), layer.kernel.shape).astype("float32"))
