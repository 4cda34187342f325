"""Evaluation-gated retraining: the training manifests under a prefix that no registry version has seen -> one
combined manifest -> features -> training warm-started from the current version (Ray Train with --workers) ->
the candidate and the current version scored on a fixed holdout -> a new version, promoted only if neither
holdout BLEU-4 nor CIDEr drops by more than the tolerance, and only if `current` has not moved meanwhile.

Vocabulary policy: a warm start keeps the parent's vocabulary; words it lacks become [UNK]. The first version
(an empty registry) builds its vocabulary from its data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from captioning.config import Scaling, TrainConfig
from captioning.manifest import ManifestSpec
from captioning.options import (guarded, job_parser, log, manifest_spec, retrain_options, scaling, show_progress,
                                train_config)
from captioning.lease import Lease
from captioning.registry import Registry, store_bundle
from captioning.runs import LEASE
from captioning.storage import Storage, is_s3, local_path

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet", ".csv.gz", ".tsv.gz", ".jsonl.gz")
METRICS = ("bleu4", "cider")


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining run: where data, registry and holdout are, the promotion rule, and the training settings."""

    registry: str
    data_prefix: str
    holdout: str
    val: str
    train: TrainConfig
    spec: ManifestSpec = ManifestSpec()
    tolerance: float = 0.02
    scaling: Scaling = Scaling(workers=0)
    address: str | None = None


def find_new(registry: Registry, data_prefix: str, storage: Storage) -> list[dict[str, Any]]:
    """Manifests under the prefix that no version was trained on (a changed file counts as new), with their
    size and content tag, in name order."""
    listing = storage.list(data_prefix if is_s3(data_prefix) else str(local_path(data_prefix)))
    manifests = [uri for uri in listing if uri.lower().endswith(MANIFEST_SUFFIXES)]
    seen = {(m["uri"], m.get("etag") or m.get("sha256")) for version in registry.versions()
            for m in registry.info(version).get("manifests", [])}
    found = []
    for uri in manifests:
        described = storage.describe(uri)
        if (uri, described.get("etag") or described.get("sha256")) not in seen:
            found.append({"uri": uri, **described})
    return found


def decide(current: dict[str, float] | None, candidate: dict[str, float], tolerance: float) -> tuple[bool, str]:
    """The promotion rule: promote unless holdout BLEU-4 or CIDEr drops by more than tolerance (relative)."""
    if current is None:
        return True, "first version of this registry"
    drops = []
    for metric in METRICS:
        floor = current[metric] * (1 - tolerance)
        if candidate[metric] < floor:
            drops.append(f"{metric} {candidate[metric]:.4f} < {current[metric]:.4f} - {tolerance:.0%}")
    if drops:
        return False, "holdout score dropped: " + "; ".join(drops)
    return True, ", ".join(f"{m} {candidate[m]:.4f} vs {current[m]:.4f}" for m in METRICS) + f" (tolerance {tolerance:.0%})"


def combined_manifest(new: list[dict[str, Any]], spec: ManifestSpec, storage: Storage, out: Path) -> int:
    """The new manifests as one JSONL of (image, caption) rows with absolute image locations; returns its rows."""
    from captioning.manifest import read_manifest  # noqa: PLC0415

    rows = 0
    with open(out, "w") as handle:
        for item in new:
            manifest = read_manifest(item["uri"], spec, storage)
            for example, caption in manifest.pairs():
                handle.write(json.dumps({"image": example.image, "caption": caption}) + "\n")
                rows += 1
    return rows


def holdout_scores(bundle_uri: str, holdout: str, spec: ManifestSpec, config: TrainConfig, storage: Storage,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """BLEU-1..4 and CIDEr of a bundle on the holdout (greedy; METEOR left out: it needs Java)."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.config import ImageConfig  # noqa: PLC0415
    from captioning.evaluate import evaluate  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415

    report = evaluate(load_bundle(bundle_uri, storage=storage), read_manifest(holdout, spec, storage), None,
                      ImageConfig(), Fetcher(config.fetch), None, meteor=False, log=log, storage=storage)
    return report["scores"]


Scorer = Callable[[str, str, ManifestSpec, TrainConfig, Storage, Callable[[str], None]], dict[str, Any]]


def retrain(config: RetrainConfig, log: Callable[[str], None] = log, progress: bool = True,
            score: Scorer | None = None) -> dict[str, Any]:
    """One retraining run; returns what it decided (also in the registry). score: the holdout scorer
    (holdout_scores; tests inject theirs to drive the decision)."""
    score = score or holdout_scores
    storage = Storage(config.train.storage)
    # One retraining per registry at a time (a scheduler reads this lease to skip a tick while a run goes on).
    with Lease(storage, f"{config.registry.rstrip('/')}/{LEASE}", log=log, what="retraining run"):
        return _retrain(config, log, progress, score, storage)


def _retrain(config: RetrainConfig, log: Callable[[str], None], progress: bool, score: Scorer,
             storage: Storage) -> dict[str, Any]:
    registry = Registry(config.registry, storage)
    pointer, tag = registry.current()  # the decision below moves `current` only if it still has this tag
    new = find_new(registry, config.data_prefix, storage)
    if not new:
        log(f"nothing new under {config.data_prefix}: every manifest there was trained on; nothing to do")
        return {"action": "nothing"}
    parent = (pointer or {}).get("version")
    version = registry.claim()
    log(f"{version}: {len(new)} new manifest(s) ({', '.join(m['uri'].rsplit('/', 1)[-1] for m in new)}); "
        + (f"warm start from {parent}" if parent else "first version: training from scratch"))
    # The combined manifest lives in the registry; its images are read as their own manifests' would be.
    train = replace(config.train, allow_local_files=not is_s3(config.data_prefix),
                    allow_s3_sources=is_s3(config.data_prefix))
    if parent:
        bundle_info = json.loads(storage.read_bytes(f"{registry.bundle_uri(parent)}/bundle.json"))
        from captioning.config import ModelConfig  # noqa: PLC0415

        train = replace(train, model=ModelConfig.from_dict(bundle_info["model"]),
                        warm_start=registry.bundle_uri(parent))
    with tempfile.TemporaryDirectory(prefix="captioning-retrain-") as tmp:
        folder = Path(tmp)
        rows = combined_manifest(new, config.spec, storage, folder / "train.jsonl")
        # Trained from the registry's copy, which the version keeps: a local registry's manifest reads local
        # images, an S3 registry's reads its bucket's (the data and the registry are of one kind).
        manifest = f"{registry.uri}/versions/{version}/train.jsonl"
        storage.upload_file(folder / "train.jsonl", manifest)
        log(f"{rows} caption rows to train on")
        out = folder / "model"
        train = replace(train, cache_dir=str(folder / "features"))
        if config.scaling.workers:
            from jobs.train import run  # noqa: PLC0415

            run(manifest, config.val, str(out), train, config.scaling, ManifestSpec(),
                config.address, log=log, progress=progress)
        else:
            from captioning.train import train as train_here  # noqa: PLC0415

            train_here(manifest, config.val, out, train, ManifestSpec(), progress=progress,
                       log=log)
        store_bundle(registry, version, str(out))
    candidate = score(registry.bundle_uri(version), config.holdout, config.spec, train, storage, log)
    current = score(registry.bundle_uri(parent), config.holdout, config.spec, train, storage, log) if parent else None
    promote, reason = decide(current, candidate, config.tolerance)
    registry.complete(version, {
        "parent": parent, "manifests": new, "train_rows": rows, "holdout": {"manifest": config.holdout,
                                                                             "scores": candidate,
                                                                             "parent_scores": current},
        "settings": {"tolerance": config.tolerance, "workers": config.scaling.workers,
                     "train": {k: v for k, v in asdict(train).items() if k not in ("storage", "fetch", "image")}},
        "decision": "pending"})
    if promote and not registry.move(version, tag, reason, "promote"):
        now_current = (registry.current()[0] or {}).get("version")
        promote, reason = False, f"current moved to {now_current} while this run trained; not promoted ({reason})"
    if not promote:
        registry.record({"event": "rejected", "version": version, "previous": parent, "reason": reason})
    registry.update(version, decision=("promoted: " if promote else "not promoted: ") + reason, promoted=promote)
    log(f"{version} {'promoted' if promote else 'not promoted'}: {reason}")
    return {"action": "promoted" if promote else "rejected", "version": version, "reason": reason,
            "scores": candidate, "parent_scores": current}


def retrain_config(args: argparse.Namespace) -> RetrainConfig:
    """The RetrainConfig of retrain_options."""
    return RetrainConfig(registry=args.registry, data_prefix=args.data_prefix, holdout=args.holdout, val=args.val,
                         train=train_config(args), spec=manifest_spec(args), tolerance=args.tolerance,
                         scaling=scaling(args), address=args.address)


def command(args: argparse.Namespace) -> int:
    """`captioning retrain` and `python -m jobs.retrain`."""
    retrain(retrain_config(args), log=log, progress=show_progress(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted or scheduled retraining job: one `error:` line on failure."""
    args = job_parser("python -m jobs.retrain", __doc__, retrain_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
