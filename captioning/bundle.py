"""Model bundle: one directory with config, vocabulary, decoder and backbone weights; loads without pickle."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning import __version__
from captioning.atomic import atomic_path, atomic_write
from captioning.config import ModelConfig
from captioning.errors import BundleError
from captioning.features import BACKBONES, Backbone
from captioning.model import Captioner
from captioning.devices import resolve_precision
from captioning.storage import Storage, StorageError, is_s3
from captioning.records import schema_error
from captioning.text import Tokenizer

FORMAT, FORMAT_VERSION = "captioning-bundle", 1
MANIFEST, VOCABULARY, DECODER, BACKBONE = "bundle.json", "vocabulary.json", "decoder.weights.h5", "backbone.weights.h5"

_COUNT = {"type": "integer", "minimum": 1}
# bundle.json is checked against this before anything is built from it: a bad file is one clear error.
SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "version", "model", "backbone"],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "version": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "model": {
            "type": "object",
            "required": ["vocab_size", "max_length", "d_model", "num_layers", "num_heads", "ff_multiplier",
                         "dropout", "backbone"],
            "additionalProperties": False,
            "properties": {
                "vocab_size": {"type": "integer", "minimum": 4}, "max_length": {"type": "integer", "minimum": 3},
                "d_model": _COUNT, "num_layers": _COUNT, "num_heads": _COUNT, "ff_multiplier": _COUNT,
                "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "backbone": {"enum": sorted(BACKBONES)},
            },
        },
        "backbone": {
            "type": "object",
            "required": ["name", "fingerprint"],
            "properties": {"name": {"enum": sorted(BACKBONES)}, "fingerprint": {"type": "string"},
                           "weights_source": {"type": "string"}, "channels": _COUNT,
                           "seed": {"type": ["integer", "null"]}},
        },
        "metrics": {"type": "object"},
    },
}


def validate_manifest(manifest: object) -> None:
    """Raise ValueError naming the first field of a bundle.json that does not fit SCHEMA."""
    problem = schema_error(manifest, SCHEMA)
    if problem is not None:
        raise ValueError(problem)
    model = manifest["model"]  # type: ignore[index]
    if model["d_model"] % model["num_heads"]:
        raise ValueError(f"model.d_model {model['d_model']} is not divisible by model.num_heads {model['num_heads']}")


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
    (path / MANIFEST).unlink(missing_ok=True)  # until the new one is written, the folder is not a bundle
    model.tokenizer.save(path / VOCABULARY)
    with atomic_path(path / DECODER) as tmp:
        model.save_weights(str(tmp))
    with atomic_path(path / BACKBONE) as tmp:
        backbone.save(tmp)
    digest = hashlib.sha256()
    for name in (VOCABULARY, DECODER):
        digest.update((path / name).read_bytes())
    version = digest.hexdigest()[:12]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "captioning_version": __version__,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model.config.to_dict(),
        "backbone": {key: value for key, value in backbone.describe().items() if key != "image_size"},
        "metrics": metrics or {},
    }
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=2).encode())
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
        validate_manifest(manifest)
        config = ModelConfig.from_dict(manifest["model"])
        backbone_info = manifest["backbone"]
    except FileNotFoundError:
        raise BundleError(str(manifest_path), "missing: not a complete model bundle") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise BundleError(str(manifest_path), f"corrupt bundle manifest: {err}") from None
    try:
        tokenizer = Tokenizer.load(path / VOCABULARY)
    except FileNotFoundError:
        raise BundleError(str(path / VOCABULARY), "missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(str(path / VOCABULARY), f"corrupt vocabulary: {err}") from None
    weights = _weights_file(path / BACKBONE)
    backbone = Backbone.from_record(backbone_info, weights, weights, BundleError, source=weights)
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
