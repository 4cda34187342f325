"""Train a captioner: feature sets and vocabulary once (prepare), the epoch loop with its hooks (fit), the bundle.

`captioning train` runs all three in one process; Ray Train (jobs/train.py) runs prepare on the driver and fit
on every worker, with one more hook that reports checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from captioning.bundle import MANIFEST, save_bundle
from captioning.config import TrainConfig
from captioning.devices import resolve_precision
from captioning.errors import CaptioningError
from captioning.featureset import FeaturesConfig, FeatureSet, extract_features, load_backbone
from captioning.generate import GenerationConfig, Generator
from captioning.lease import leased
from captioning.manifest import Manifest, ManifestSpec, iter_rows
from captioning.model import BANNED, Captioner, output_bias
from captioning.output_source import bulk_output_format, describe_source
from captioning.runs import claim_run, run_settings
from captioning.shards import defaults
from captioning.storage import Storage, cache_dir, is_s3, local_path
from captioning.text import Tokenizer
from captioning.training.data import StreamingInput
from captioning.training.hooks import Checkpoints, EarlyStopping, History, SampleCaption, TimeBudget, write_history
from captioning.training.loop import EpochLoop, Hook, Trainer, TrainState

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    """What a training run produced."""

    bundle: str
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool
    version: str
    restores: int = 0


@dataclass
class Prepared:
    """What every worker needs, made once before training: the feature sets and the vocabulary with its counts."""

    train: str  # feature set URIs
    val: str
    vocabulary: list[str]
    max_length: int
    token_counts: list[int]
    train_pairs: int
    train_images: int
    val_pairs: int
    storage: Any = field(default=None, repr=False)

    def tokenizer(self) -> Tokenizer:
        """The shared tokenizer."""
        return Tokenizer(self.vocabulary, self.max_length)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for train_loop_config."""
        return {k: v for k, v in self.__dict__.items() if k != "storage"}


SHOWN_FAILURES = 20  # failed rows named one by one in the log; the rest are counted


MakeFeatures = Callable[[FeaturesConfig, Any], Any]  # (config, backbone) -> runs a features job to completion


def feature_set_for(source: str | Path | Manifest, split: str, config: TrainConfig, spec: ManifestSpec, root: str,
                    make: MakeFeatures, log: Callable[[str], None], min_shards: int = 1,
                    backbone: Any = None) -> FeatureSet:
    """A feature set as given, or one made for a manifest with `backbone` (default: the configured one; kept
    under root, reused while the manifest's content, columns and backbone stay the same). Rows without an
    image are logged, not dropped."""
    storage = Storage(config.storage)
    source = _uri(source)
    made = FeatureSet(source, storage) if FeatureSet.is_feature_set(source, storage) else \
        _make_feature_set(source, config, spec, root, make, min_shards, backbone)
    failures = list(itertools.islice(made.failures(), SHOWN_FAILURES + 1))
    for record in failures[:SHOWN_FAILURES]:
        log(f"skipped {record['status']} row: {record['error']}")
    failed = sum(m.rows - m.images for m in made.shards)
    if failed > SHOWN_FAILURES:
        log(f"... {failed - SHOWN_FAILURES} more rows without an image (each is listed in "
            f"{made.location}/features/*.json)")
    if not made.pairs:
        raise CaptioningError(source, f"no usable {split} examples (every image or row failed)")
    return made


def _uri(source: str | Path | Manifest) -> str:
    return source.source if isinstance(source, Manifest) else str(source)


def _make_feature_set(source: str, config: TrainConfig, spec: ManifestSpec, root: str,
                      make: MakeFeatures, min_shards: int, backbone: Any = None) -> FeatureSet:
    storage = Storage(config.storage)
    output = bulk_output_format(source, storage)
    if output is None and not storage.exists(source):
        raise CaptioningError(source, "manifest not found")
    from captioning.features import Backbone  # noqa: PLC0415

    backbone = backbone or Backbone(config.model.backbone, config.weights, seed=config.backbone_seed,
                                    image_size=config.image.size)
    shard_size = defaults.SHARD_SIZE  # about 14 MiB of float16 features a shard
    if min_shards > 1:  # every worker needs shards of its own, and a few to shuffle
        rows = sum(1 for _ in iter_rows(source, spec, storage))
        shard_size = max(1, min(defaults.SHARD_SIZE, rows // min_shards))
    described = json.dumps([describe_source(source, storage, output), spec.__dict__, shard_size], sort_keys=True)
    folder = "/".join([root.rstrip("/"), f"{backbone.name}-{backbone.fingerprint()}",
                       hashlib.sha256(described.encode()).hexdigest()[:16]])
    features = FeaturesConfig.reading_own_kind(
        source, folder, spec=spec, backbone=backbone.name, weights=backbone.weights_source,
        seed=config.backbone_seed if backbone.seed is None else backbone.seed, shard_size=shard_size, fetch=config.fetch, image=config.image, storage=config.storage,
        allow_local_files=config.allow_local_files, allow_s3_sources=config.allow_s3_sources)
    make(features, backbone)
    return FeatureSet(folder, storage)


class WarmStart:
    """The parts of a parent bundle a warm start takes: backbone, vocabulary, decoder weights (fetched once
    from S3 into the private cache)."""

    def __init__(self, bundle: str, storage: Storage) -> None:
        self.bundle = bundle
        self.folder = storage.local_dir(bundle)

    def backbone(self) -> Any:
        """The parent's exact backbone, so new features match the ones it was trained on."""
        from captioning.bundle import BACKBONE, MANIFEST  # noqa: PLC0415
        from captioning.features import Backbone  # noqa: PLC0415

        info = json.loads((self.folder / MANIFEST).read_text())["backbone"]
        weights = str(self.folder / BACKBONE)
        return Backbone.from_record(info, weights, self.bundle, source=weights)

    def tokenizer(self) -> Tokenizer:
        """The parent's vocabulary, unchanged."""
        from captioning.bundle import VOCABULARY  # noqa: PLC0415

        return Tokenizer.load(self.folder / VOCABULARY)

    def decoder_weights(self) -> Path:
        """The parent's decoder weights file."""
        from captioning.bundle import DECODER  # noqa: PLC0415

        return self.folder / DECODER


def _given_backbone(sources: list[str], storage: Storage) -> Any:
    """A feature set's own backbone when a manifest comes beside it: the manifest must be embedded alike, or
    training and validation features would not match (--weights applies only when both are manifests)."""
    given = [FeatureSet.is_feature_set(source, storage) for source in sources]
    if all(given) or not any(given):
        return None
    return load_backbone(sources[given.index(True)], storage)


def prepare(train_source: str | Path | Manifest, val_source: str | Path | Manifest, config: TrainConfig,
            spec: ManifestSpec | None = None, feature_root: str | Path | None = None,
            make: MakeFeatures | None = None, log: Callable[[str], None] = print,
            progress: bool = True, workers: int = 1) -> Prepared:
    """Feature sets for both splits (made with `make`, in-process by default, when given manifests) and the
    vocabulary, from one streaming pass over the training captions."""
    spec = spec or ManifestSpec()
    root = str(feature_root or config.cache_dir or cache_dir() / "features")
    make = make or (lambda features, backbone: extract_features(features, log, progress, backbone))
    storage = Storage(config.storage)
    parent = WarmStart(config.warm_start, storage) if config.warm_start else None
    backbone = parent.backbone() if parent else _given_backbone([_uri(train_source), _uri(val_source)], storage)
    train_set = feature_set_for(train_source, "training", config, spec, root, make, log, 4 * workers, backbone)
    val_set = feature_set_for(val_source, "validation", config, spec, root, make, log, backbone=backbone)
    if train_set.backbone["fingerprint"] != val_set.backbone["fingerprint"]:
        raise CaptioningError(val_set.location, "was made with another backbone than the training features")
    log(f"training on {train_set.pairs} captions of {train_set.images} images ({len(train_set.shards)} shards), "
        f"validating on {val_set.pairs} captions of {val_set.images} images")
    if parent:  # the parent's vocabulary as it is; the output bias comes with the parent's weights
        tokenizer = parent.tokenizer()
        counts = np.ones(tokenizer.size, np.int64)
        log(f"warm start from {config.warm_start}: its vocabulary ({tokenizer.size} tokens) is kept, new words "
            "become [UNK]")
    else:
        tokenizer, counts = Tokenizer.build_counted(train_set.captions(), config.model.vocab_size,
                                                    config.model.max_length)
    return Prepared(train_set.location, val_set.location, tokenizer.vocabulary, tokenizer.max_length,
                    counts.tolist(), train_set.pairs, train_set.images, val_set.pairs, Storage(config.storage))


def fit(prepared: Prepared, config: TrainConfig, checkpoint: Path, out: Path | None,
        strategy: tf.distribute.Strategy | None = None, pipelines: int = 1, rank: int = 0,
        extra_hooks: Sequence[Hook] = (), checkpoints: type[Checkpoints] = Checkpoints,
        log: Callable[[str], None] = print, progress: bool = True) -> tuple[Captioner, TrainState]:
    """The epoch loop on this worker, from the checkpoint folder if it holds one; rank 0 writes checkpoints
    and (when out is set) the history and curves there. Returns the model with its best weights."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    storage = prepared.storage or Storage(config.storage)
    train_set, val_set = FeatureSet(prepared.train, storage), FeatureSet(prepared.val, storage)
    tokenizer = prepared.tokenizer()
    model_config = replace(config.model, vocab_size=tokenizer.size)
    with strategy.scope():
        bias = output_bias(np.asarray(prepared.token_counts), [tokenizer.id(t) for t in BANNED])
        model = Captioner(model_config, tokenizer, bias, dtype=resolve_precision(config.precision))
        model.build_for(train_set.channels)
        if config.warm_start:
            model.load_weights(str(WarmStart(config.warm_start, storage).decoder_weights()))
    trainer = Trainer(model, config, strategy)
    writer = rank == 0
    early = EarlyStopping(model, config.patience, log)
    saver = checkpoints(checkpoint, trainer, early, writer=writer, every_steps=config.checkpoint_every)
    state = TrainState()
    if saver.exists():
        state = saver.restore()
        state.restores += 1
        log(f"resuming from the checkpoint after epoch {state.epoch}"
            + (f", step {state.step}" if state.step else ""))

    layout = {"group": config.group_by_image, "trim": config.padding == "bucket"}
    train_input = StreamingInput(train_set, tokenizer, config.batch_size, pipelines, True, config.seed,
                                 config.shuffle_buffer, **layout)
    val_input = StreamingInput(val_set, tokenizer, config.batch_size, pipelines, False, **layout)
    train_input.epoch = state.epoch  # the resumed epoch replays the very same order
    steps = min(train_input.steps, config.steps_per_epoch or train_input.steps)
    if writer:
        log(f"global batch {config.batch_size} ({config.batch_size // pipelines} per worker x {pipelines}), "
            f"learning rate {config.learning_rate:g}, {steps} steps per epoch; "
            + ("batches of whole images" if config.group_by_image else "one image row per caption")
            + (", tokens padded to the batch's longest caption (buckets of 8)" if config.padding == "bucket"
               else f", tokens padded to --max-length ({tokenizer.max_length})")
            + f", XLA {'on' if trainer.xla else 'off'}")

    hooks: list[Hook] = [early]
    if config.sample_every_epoch and writer:
        record, features = val_set.first_image()
        sampler = Generator(model, GenerationConfig(attention=False))
        hooks.append(SampleCaption(lambda: sampler(features[np.newaxis].astype(np.float32)).captions[0],
                                   Path(str(record["image"])).name, log))
    # Order matters: early stopping decides what is best before the checkpoint records it.
    hooks += [saver, *([History(out)] if out is not None and writer else []),
              TimeBudget(config.max_seconds, trainer.agree), *extra_hooks]
    state = EpochLoop(trainer, config.epochs, hooks, log, progress).run(
        trainer.distribute(train_input), trainer.distribute(val_input), steps, val_input.steps, state,
        examples_per_step=config.batch_size)
    return model, state


def bundle_metrics(prepared: Prepared, state: TrainState) -> dict[str, Any]:
    """What the bundle records of the run: the best epoch's metrics and the data size."""
    best = state.history[state.best_epoch - 1]
    return {"best_epoch": state.best_epoch, **{k: v for k, v in best.items() if k != "epoch"},
            "train_images": prepared.train_images, "train_captions": prepared.train_pairs,
            "restores": state.restores}


def publish(local: Path, out: str, storage: Storage) -> None:
    """Copy a finished model folder to out: an S3 prefix (bundle.json last, so it marks completeness) or a path."""
    if is_s3(out):
        storage.upload_dir(local, out, last=MANIFEST)
    elif local.resolve() != local_path(out).resolve():
        shutil.copytree(local, local_path(out), dirs_exist_ok=True)


def staging_dir(out: str) -> Path:
    """Where a run whose --out is on S3 keeps its checkpoint and bundle before the upload (same machine: it
    resumes)."""
    return cache_dir() / "train-staging" / hashlib.sha1(out.encode()).hexdigest()[:16]


def train(
    train_source: str | Path | Manifest,
    val_source: str | Path | Manifest,
    out: str | Path,
    config: TrainConfig,
    spec: ManifestSpec | None = None,
    strategy: tf.distribute.Strategy | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    restart: bool = False,
) -> TrainResult:
    """Train in this process and write the bundle to out, a folder or s3:// prefix: a run with the settings
    recorded there resumes from its checkpoint, other settings are refused (restart: discard that run). Sources
    are manifests (features are made here first) or feature sets."""
    out = str(out)
    storage = Storage(config.storage)
    storage.check_writable(out)
    with leased(storage, out, "training run", log):  # one run per --out
        return _train(train_source, val_source, out, config, spec, strategy, progress, log, restart, storage)


def _train(train_source: str | Path | Manifest, val_source: str | Path | Manifest, out: str, config: TrainConfig,
           spec: ManifestSpec | None, strategy: tf.distribute.Strategy | None, progress: bool,
           log: Callable[[str], None], restart: bool, storage: Storage) -> TrainResult:
    local = staging_dir(out) if is_s3(out) else local_path(out)
    settings = run_settings(_uri(train_source), _uri(val_source), config, spec or ManifestSpec(), 0, storage)
    claim_run(out, settings, storage, restart, lambda: shutil.rmtree(local / CHECKPOINT, ignore_errors=True), log)
    local.mkdir(parents=True, exist_ok=True)
    feature_root = config.cache_dir or str(local / "features")
    prepared = prepare(train_source, val_source, config, spec, feature_root, log=log, progress=progress)
    strategy = strategy or tf.distribute.get_strategy()
    model, state = fit(prepared, config, local / CHECKPOINT, local, strategy, log=log, progress=progress)
    if is_s3(out):
        version = write_model(prepared, model, state, out)
    else:
        version = save_bundle(local, model, load_backbone(prepared.train, prepared.storage),
                              bundle_metrics(prepared, state))
    return TrainResult(out, state.history, state.best_epoch, state.stopped_early, version, state.restores)


def write_model(prepared: Prepared, model: Captioner, state: TrainState, out: str) -> str:
    """Bundle, history and curves of a finished run, written to out (folder or s3://); returns the version."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_history(folder, state.history)
        version = save_bundle(folder, model, load_backbone(prepared.train, prepared.storage),
                              bundle_metrics(prepared, state))
        publish(folder, out, prepared.storage or Storage())
    return version
