"""Model bundle: one directory with config, vocabulary, decoder and backbone weights; loads without pickle."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning import __version__
from captioning.config import ModelConfig
from captioning.errors import BundleError
from captioning.features import Backbone
from captioning.model import Captioner
from captioning.devices import resolve_precision
from captioning.storage import Storage, StorageError, is_s3
from captioning.text import Tokenizer

FORMAT, FORMAT_VERSION = "captioning-bundle", 1
MANIFEST, VOCABULARY, DECODER, BACKBONE = "bundle.json", "vocabulary.json", "decoder.weights.h5", "backbone.weights.h5"


@dataclass
class Bundle:
    """A loaded model: decoder, its tokenizer (on the model) and the exact backbone it was trained with."""

    model: Captioner
    backbone: Backbone
    version: str
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


def save_bundle(path: str | Path, model: Captioner, backbone: Backbone, metrics: dict[str, Any] | None = None) -> str:
    """Write the bundle files; bundle.json goes last and marks the bundle complete. Returns the version."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save(_tmp(path / VOCABULARY))
    model.save_weights(str(_tmp(path / DECODER)))
    backbone.save(_tmp(path / BACKBONE))
    digest = hashlib.sha256()
    for name in (VOCABULARY, DECODER):
        digest.update(_tmp(path / name).read_bytes())
        _tmp(path / name).replace(path / name)
    _tmp(path / BACKBONE).replace(path / BACKBONE)
    version = digest.hexdigest()[:12]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "captioning_version": __version__,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model.config.to_dict(),
        "backbone": {"name": backbone.name, "weights_source": backbone.weights_source,
                     "fingerprint": backbone.fingerprint(), "channels": backbone.channels},
        "metrics": metrics or {},
    }
    _tmp(path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _tmp(path / MANIFEST).replace(path / MANIFEST)
    return version


def load_bundle(path: str | Path, precision: str = "float32", storage: Storage | None = None) -> Bundle:
    """Load a bundle directory (local or s3:// prefix); a missing or corrupt part raises BundleError naming it.

    precision is the decoder's compute precision ("auto" picks mixed precision on GPUs).
    """
    source = str(path)
    if is_s3(source):
        try:
            path = (storage or Storage()).local_dir(source)
        except StorageError as err:
            raise BundleError(source, f"cannot fetch model bundle: {err.message}") from None
    path = Path(path)
    if not path.is_dir():
        raise BundleError(str(path), "model directory not found")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"bundle format version {manifest.get('format_version')} is not supported")
        config = ModelConfig.from_dict(manifest["model"])
        backbone_info = manifest["backbone"]
    except FileNotFoundError:
        raise BundleError(str(manifest_path), "missing: not a complete model bundle") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(str(manifest_path), f"corrupt bundle manifest: {err}") from None
    try:
        tokenizer = Tokenizer.load(path / VOCABULARY)
    except FileNotFoundError:
        raise BundleError(str(path / VOCABULARY), "missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(str(path / VOCABULARY), f"corrupt vocabulary: {err}") from None
    backbone = Backbone(backbone_info["name"], weights=_weights_file(path / BACKBONE))
    if backbone.fingerprint() != backbone_info.get("fingerprint"):
        raise BundleError(str(path / BACKBONE), "backbone weights do not match the bundle's fingerprint")
    model = Captioner(config, tokenizer, dtype=resolve_precision(precision))
    model.build_for(backbone.channels)
    try:
        model.load_weights(str(_existing(path / DECODER)))
    except BundleError:
        raise
    except Exception as err:  # h5py and keras raise many types for a damaged file
        raise BundleError(str(path / DECODER), f"cannot load decoder weights: {err}") from None
    return Bundle(model, backbone, manifest["version"], source, manifest)


def _weights_file(path: Path) -> str:
    _existing(path)
    return str(path)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise BundleError(str(path), "missing: not a complete model bundle")
    return path


def _tmp(path: Path) -> Path:
    # Keras insists on the .weights.h5 ending, so the marker goes in front of the name.
    return path.with_name(f".tmp-{path.name}")
