"""Frozen image backbones (MobileNetV3Small by default) and the sharded on-disk feature cache."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from einops import rearrange

from captioning import console
from captioning.atomic import atomic_path, atomic_write
from captioning.errors import CaptioningError


@dataclass(frozen=True)
class BackboneSpec:
    """A keras.applications model usable as a 7x7 feature extractor."""

    build: Callable[..., keras.Model]
    channels: int


BACKBONES: dict[str, BackboneSpec] = {
    # All of these take 0..255 RGB and normalise inside the model.
    "mobilenet_v3_small": BackboneSpec(
        lambda **kw: keras.applications.MobileNetV3Small(include_preprocessing=True, **kw), 576),
    "mobilenet_v3_large": BackboneSpec(
        lambda **kw: keras.applications.MobileNetV3Large(include_preprocessing=True, **kw), 960),
    "efficientnet_b0": BackboneSpec(lambda **kw: keras.applications.EfficientNetB0(**kw), 1280),
}


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


def reinitialise(model: keras.Model, seed: int) -> None:
    """He-normal conv kernels from a seed: Keras' default init makes MobileNetV3 features vanish (~1e-10)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D)):
            kh, kw, cin, _ = layer.kernel.shape
            fan_in = kh * kw * (1 if isinstance(layer, keras.layers.DepthwiseConv2D) else cin)
            layer.kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), layer.kernel.shape).astype("float32"))


class FeatureCache:
    """Features per image key in .npy shards under <dir>/<backbone>-<fingerprint>/; safe to resume."""

    def __init__(self, root: str | Path, backbone: Backbone, shard_size: int = 1024) -> None:
        self.backbone = backbone
        self.dir = Path(root) / f"{backbone.name}-{backbone.fingerprint()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: dict[int, np.ndarray] = {}
        for keys_file in sorted(self.dir.glob("shard-*.keys.json")):
            shard = int(keys_file.name.split("-")[1].split(".")[0])
            for row, key in enumerate(json.loads(keys_file.read_text())):
                self._index[key] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> np.ndarray:
        """Features (49, C) float16 for one image key."""
        shard, row = self._index[key]
        if shard not in self._shards:
            self._shards[shard] = np.load(self.dir / f"shard-{shard:05d}.npy", mmap_mode="r", allow_pickle=False)
        return self._shards[shard][row]

    def fill(
        self,
        items: Sequence[tuple[str, str]],
        load: Callable[[str], np.ndarray],
        batch_size: int = 64,
        workers: int = 4,
        progress: bool = True,
    ) -> dict[str, CaptioningError]:
        """Compute features for (key, source) items not cached yet; returns the errors per key."""
        todo = list(dict((k, s) for k, s in items if k not in self._index).items())
        errors: dict[str, CaptioningError] = {}
        if not todo:
            return errors
        next_shard = 1 + max((s for s, _ in self._index.values()), default=-1)
        keys: list[str] = []
        feats: list[np.ndarray] = []

        def decode(item: tuple[str, str]) -> tuple[str, np.ndarray | CaptioningError]:
            try:
                return item[0], load(item[1])
            except CaptioningError as err:
                return item[0], err

        bar = console.progress(len(todo), "backbone features", "images", progress)
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(todo), batch_size):
                batch_keys, images = [], []
                for key, result in pool.map(decode, todo[start : start + batch_size]):
                    if isinstance(result, CaptioningError):
                        errors[key] = result
                    else:
                        batch_keys.append(key)
                        images.append(result)
                if images:
                    feats.append(self.backbone(np.stack(images)).numpy().astype(np.float16))
                    keys.extend(batch_keys)
                bar.update(len(todo[start : start + batch_size]))
                if len(keys) >= self.shard_size:
                    next_shard = self._write(next_shard, keys, feats)
                    keys, feats = [], []
        bar.close()
        if keys:
            self._write(next_shard, keys, feats)
        return errors

    def _write(self, shard: int, keys: list[str], feats: list[np.ndarray]) -> int:
        array = np.concatenate(feats)
        path = self.dir / f"shard-{shard:05d}.npy"
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        # The keys file is the commit marker: a shard without one is ignored and rewritten.
        atomic_write(self.dir / f"shard-{shard:05d}.keys.json", json.dumps(keys).encode())
        for row, key in enumerate(keys):
            self._index[key] = (shard, row)
        return shard + 1
