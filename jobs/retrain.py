"""Evaluation-gated retraining: the training manifests under a prefix that no registry version has seen -> one
combined manifest -> features -> training warm-started from the current version (Ray Train with --workers) ->
the candidate and the current version scored on a fixed holdout -> a new version, promoted only if neither
holdout BLEU-4 nor CIDEr drops by more than the tolerance, and only if `current` has not moved meanwhile.

The gate fails closed: the holdout and the validation manifest must hold --min-holdout-rows scorable rows before a
version is claimed; after training, candidate and parent are scored on the very same images, which must be at
least --min-scored-share of the holdout, with finite scores. Anything short of that is recorded as `rejected` with
its reason (version.json and the history), and no claimed version is ever left without its version.json.

Vocabulary policy: a warm start keeps the parent's vocabulary; words it lacks become [UNK]. The first version
(an empty registry) builds its vocabulary from its data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from captioning.config import Scaling, TrainConfig, option
from captioning.errors import CaptioningError
from captioning.manifest import ManifestSpec
from captioning.output_source import bulk_output_format, describe_source
from captioning.shards.layout import PLAN
from jobs.options import (config_values, guarded, job_parser, log, manifest_spec, retrain_options, scaling, show_progress,
                                train_config)
from captioning.lease import Lease, leased
from captioning.registry import Registry, store_bundle
from captioning.storage import Storage, is_s3, local_path

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet", ".csv.gz", ".tsv.gz", ".jsonl.gz")
METRICS = ("bleu4", "cider")


@dataclass(frozen=True)
class RetrainConfig:
    """One retraining run: where data, registry and holdout are, the promotion rule, and the training settings."""

    registry: str = option("--registry", group="data", help="model registry: folder or s3:// prefix")
    data_prefix: str = option("--data-prefix", group="data", help="folder or s3:// prefix of training manifests; "
                              "those no version has seen are used")
    holdout: str = option("--holdout", group="data", help="fixed holdout manifest: the promotion decision's data")
    val: str = option("--val", group="data",
                      help="fixed validation manifest (early stopping); not the holdout")
    train: TrainConfig
    spec: ManifestSpec = ManifestSpec()
    tolerance: float = option("--tolerance", default=0.02, kind="drop", group="promotion",
                              help="largest relative drop of holdout BLEU-4 or CIDEr that still promotes, in [0, 1)")
    scaling: Scaling = Scaling(workers=0)
    address: str | None = None
    min_rows: int = option("--min-holdout-rows", default=20, kind="positive", group="promotion",
                           help="scorable rows (captions and an image) the holdout and --val must each hold; checked "
                           "before a version is claimed")
    min_scored_share: float = option("--min-scored-share", default=1.0, kind="share", group="promotion",
                                     help="share of the holdout's rows that the candidate and its parent must both "
                                     "have scored for a promotion (1: every image)")


def find_new(registry: Registry, data_prefix: str, storage: Storage) -> list[dict[str, Any]]:
    """Manifests under the prefix that no version was trained on (a changed file counts as new), with their
    size and content tag, in name order."""
    where = data_prefix if is_s3(data_prefix) else str(local_path(data_prefix))
    if not is_s3(data_prefix) and not Path(where).is_dir():
        raise CaptioningError(data_prefix, "no such folder: --data-prefix must name the folder of training manifests")
    listing = storage.list(where)
    if is_s3(data_prefix) and not listing:
        raise CaptioningError(data_prefix, "nothing is stored under this prefix: --data-prefix must name the prefix "
                              "of training manifests")
    # A WebDataset bulk output under the prefix is one manifest (its images are in its tars), and its own files
    # (shard inputs among them) are not manifests.
    outputs = sorted({u.rsplit("/", 1)[0] for u in listing if u.rsplit("/", 1)[-1] == PLAN
                      and bulk_output_format(u.rsplit("/", 1)[0], storage)})
    manifests = [uri for uri in listing if uri.lower().endswith(MANIFEST_SUFFIXES)
                 and not any(uri.startswith(output + "/") for output in outputs)] + outputs
    if listing and not manifests:  # files, but none a manifest: the prefix of something else
        raise CaptioningError(data_prefix, f"holds {len(listing)} file(s) but no training manifest "
                              f"({', '.join(MANIFEST_SUFFIXES)})")
    infos = [registry.info(version) for version in registry.versions()]
    # A version whose run failed before deciding trained on nothing for good: its manifests are still new.
    seen = {(m["uri"], m.get("etag") or m.get("sha256")) for info in infos if not info.get("failed")
            for m in info.get("manifests", [])}
    found = []
    for uri in manifests:
        described = describe_source(uri, storage, "webdataset" if uri in outputs else None)
        if (uri, described.get("etag") or described.get("sha256")) not in seen:
            found.append({"uri": uri, **described})
    return found


def check_tolerance(tolerance: float) -> None:
    """--tolerance is a relative drop: at least 0, below 1 (1 would promote a candidate that scores nothing)."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise CaptioningError("--tolerance", f"{tolerance!r} is not a relative drop in [0, 1)")


def decide(current: dict[str, float] | None, candidate: dict[str, float], tolerance: float) -> tuple[bool, str]:
    """The promotion rule: promote unless holdout BLEU-4 or CIDEr drops by more than tolerance (relative);
    a score that is missing or not finite never promotes."""
    check_tolerance(tolerance)
    for name, scores in (("candidate", candidate), ("parent", current)):
        if scores is None:
            continue
        bad = [m for m in METRICS if not isinstance(scores.get(m), (int, float)) or not math.isfinite(scores[m])]
        if bad:
            return False, f"the {name}'s holdout {' and '.join(bad)} is not a finite number: nothing to compare"
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


def gate(candidate: dict[str, Any], parent: dict[str, Any] | None, tolerance: float,
         min_share: float) -> tuple[bool, str, dict[str, Any] | None, dict[str, Any] | None]:
    """The decision on two holdout reports: (promote, reason, candidate scores, parent scores), both scored on the
    very same images. A report (see holdout_scores) holds `rows` (the holdout's scorable rows), `images` (the ids
    scored) and `scores`; with `captions` and `references` it can be rescored on fewer images."""
    rows = int(candidate.get("rows", 0))
    ids = set(candidate.get("images", []))
    if parent is not None:
        ids &= set(parent.get("images", []))
    needed = max(1, math.ceil(min_share * rows))
    if rows == 0 or len(ids) < needed:
        who = "both the candidate and the parent" if parent is not None else "the candidate"
        failed = candidate.get("failures") or (parent or {}).get("failures") or []
        first = f"; first failure: {failed[0].get('error', '')}"[:300] if failed else ""
        return (False, f"incomplete evidence: {len(ids)} of {rows} holdout images were scored by {who}, "
                f"{needed} needed (--min-scored-share {min_share:g}){first}", candidate.get("scores"),
                (parent or {}).get("scores"))
    scores = [_on(report, ids) for report in (candidate, parent) if report is not None]
    if any(s is None for s in scores):
        return (False, "incomplete evidence: candidate and parent were scored on different images and cannot be "
                "rescored on the same ones", candidate.get("scores"), (parent or {}).get("scores"))
    mine, theirs = scores[0], (scores[1] if parent is not None else None)
    promote, reason = decide(theirs, mine, tolerance)
    if promote:
        reason += f"; on {len(ids)} of {rows} holdout images"
    return promote, reason, mine, theirs


def _on(report: dict[str, Any], ids: set[str]) -> dict[str, Any] | None:
    """A report's scores on exactly these images: as they are when it scored just those, else rescored."""
    if set(report.get("images", [])) == ids:
        return report["scores"]
    if "captions" not in report or "references" not in report:
        return None
    from captioning.evaluate import corpus_scores  # noqa: PLC0415

    return corpus_scores({i: report["references"][i] for i in ids}, {i: report["captions"][i] for i in ids},
                         meteor=False)


def finite(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """Scores as stored: a value that is not a finite number is kept as null (JSON has no NaN)."""
    if scores is None:
        return None
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in scores.items()}


def scorable_rows(manifest_uri: str, spec: ManifestSpec, storage: Storage) -> int:
    """Rows of a manifest with reference captions and an image that is there (URLs are counted: they are only
    known once fetched)."""
    from captioning.fetch import is_url  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415

    count = 0
    for example in read_manifest(manifest_uri, spec, storage).examples:
        if not example.captions:
            continue
        image = example.image
        if is_url(image) or (storage.exists(image) if is_s3(image) else Path(image).is_file()):
            count += 1
    return count


def check_holdout(config: RetrainConfig, storage: Storage) -> None:
    """Before a version is claimed: the holdout and --val each hold at least min_rows scorable rows."""
    for flag, uri in (("--holdout", config.holdout), ("--val", config.val)):
        rows = scorable_rows(uri, ManifestSpec() if flag == "--val" else config.spec, storage)
        if rows < config.min_rows:
            raise CaptioningError(uri, f"{flag} has {rows} scorable row(s) (reference captions and an image that "
                                  f"exists); the promotion gate needs at least {config.min_rows} "
                                  "(--min-holdout-rows)")


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
    """A bundle's holdout report: BLEU-1..4 and CIDEr (greedy; METEOR left out: it needs Java) as `scores` (None
    when no image could be captioned), the ids scored, the holdout's scorable rows, captions, references and
    failures (what gate() needs to compare two bundles on the same images)."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.config import ImageConfig  # noqa: PLC0415
    from captioning.evaluate import evaluate  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415

    manifest = read_manifest(holdout, spec, storage)
    report = evaluate(load_bundle(bundle_uri, storage=storage), manifest, None, ImageConfig(), Fetcher(config.fetch),
                      None, meteor=False, log=log, storage=storage, allow_empty=True)
    return {"scores": report["scores"], "rows": sum(1 for ex in manifest.examples if ex.captions),
            "images": [row["id"] for row in report["captions"]],
            "captions": {row["id"]: row["caption"] for row in report["captions"]},
            "references": {row["id"]: row["references"] for row in report["captions"]},
            "failures": report["failures"]}


Scorer = Callable[[str, str, ManifestSpec, TrainConfig, Storage, Callable[[str], None]], dict[str, Any]]


def retrain(config: RetrainConfig, log: Callable[[str], None] = log, progress: bool = True,
            score: Scorer | None = None) -> dict[str, Any]:
    """One retraining run; returns what it decided (also in the registry). score: the holdout scorer
    (holdout_scores; tests inject theirs to drive the decision)."""
    check_tolerance(config.tolerance)
    score = score or holdout_scores
    storage = Storage(config.train.storage)
    # One retraining per registry at a time (a scheduler reads this lease to skip a tick while a run goes on).
    with leased(storage, config.registry, "retraining run", log) as lease:
        return _retrain(config, log, progress, score, storage, lease)


def _retrain(config: RetrainConfig, log: Callable[[str], None], progress: bool, score: Scorer,
             storage: Storage, lease: Lease) -> dict[str, Any]:
    registry = Registry(config.registry, storage)
    for version in registry.abandoned():  # claimed by a run that died before deciding
        _reject(registry, version, None, "the run that claimed this version stopped before deciding", log, {})
    pointer, tag = registry.current()  # the decision below moves `current` only if it still has this tag
    new = find_new(registry, config.data_prefix, storage)
    if not new:
        log(f"nothing new under {config.data_prefix}: every manifest there was trained on; nothing to do")
        return {"action": "nothing"}
    check_holdout(config, storage)  # before a number is taken: a bad holdout costs no training
    parent = (pointer or {}).get("version")
    version = registry.claim()
    log(f"{version}: {len(new)} new manifest(s) ({', '.join(m['uri'].rsplit('/', 1)[-1] for m in new)}); "
        + (f"warm start from {parent}" if parent else "first version: training from scratch"))
    record: dict[str, Any] = {"parent": parent, "manifests": new,
                              "settings": {"tolerance": config.tolerance, "workers": config.scaling.workers,
                                           "min_holdout_rows": config.min_rows,
                                           "min_scored_share": config.min_scored_share}}
    try:
        return _train_and_decide(config, registry, version, parent, tag, new, record, log, progress, score,
                                 storage, lease)
    except BaseException as err:
        reason = f"the run failed before deciding: {err if isinstance(err, CaptioningError) else repr(err)}"
        _reject(registry, version, parent, " ".join(reason.split())[:500], log, record)
        raise


def _reject(registry: Registry, version: str, parent: str | None, reason: str, log: Callable[[str], None],
            record: dict[str, Any]) -> None:
    """Record a version as rejected (version.json and the history), as far as storage lets us."""
    try:
        registry.complete(version, {**record, "parent": parent, "decision": f"not promoted: {reason}",
                                    "promoted": False, "failed": True})
        registry.record({"event": "rejected", "version": version, "previous": parent, "reason": reason})
        log(f"warning: {version} not promoted: {reason}")
    except Exception as err:  # noqa: BLE001  (storage down: the next run settles the claim)
        log(f"warning: could not record {version} as rejected ({err}); the next retraining run will")


def _train_and_decide(config: RetrainConfig, registry: Registry, version: str, parent: str | None, tag: str | None,
                      new: list[dict[str, Any]], record: dict[str, Any], log: Callable[[str], None],
                      progress: bool, score: Scorer, storage: Storage, lease: Lease) -> dict[str, Any]:
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
        lease.check()
        store_bundle(registry, version, str(out))
    candidate = score(registry.bundle_uri(version), config.holdout, config.spec, train, storage, log)
    current = score(registry.bundle_uri(parent), config.holdout, config.spec, train, storage, log) if parent else None
    promote, reason, mine, theirs = gate(candidate, current, config.tolerance, config.min_scored_share)
    record.update(train_rows=rows, holdout={"manifest": config.holdout, "scores": finite(mine),
                                            "parent_scores": finite(theirs),
                                            "images": len(candidate.get("images", [])),
                                            "rows": int(candidate.get("rows", 0))})
    record["settings"]["train"] = {k: v for k, v in asdict(train).items() if k not in ("storage", "fetch", "image")}
    registry.complete(version, {**record, "decision": "pending"})
    lease.check()
    if promote and not registry.move(version, tag, reason, "promote"):
        now_current = (registry.current()[0] or {}).get("version")
        promote, reason = False, f"current moved to {now_current} while this run trained; not promoted ({reason})"
    if not promote:
        registry.record({"event": "rejected", "version": version, "previous": parent, "reason": reason})
    registry.update(version, decision=("promoted: " if promote else "not promoted: ") + reason, promoted=promote)
    log(f"{version} {'promoted' if promote else 'not promoted'}: {reason}")
    return {"action": "promoted" if promote else "rejected", "version": version, "reason": reason,
            "scores": mine, "parent_scores": theirs}


def retrain_config(args: argparse.Namespace) -> RetrainConfig:
    """The RetrainConfig of retrain_options."""
    return RetrainConfig(**config_values(args, RetrainConfig), train=train_config(args), spec=manifest_spec(args),
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
