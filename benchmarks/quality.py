"""Quality benchmark: the trained captioner against two baselines, on held-out synthetic scenes, in one run.

Baselines (same data, same backbone features, same scorer):
  * most-common: every image gets the most frequent training caption;
  * nearest-neighbour: every image gets the first caption of the training image whose 7x7x576 feature map
    is closest (cosine) to its own.

    python benchmarks/quality.py --budget-minutes 15
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.bundle import load_bundle  # noqa: E402
from captioning.config import ModelConfig, TrainConfig  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from captioning.evaluate import corpus_scores, evaluate, format_scores  # noqa: E402
from captioning.manifest import read_manifest  # noqa: E402
from captioning.text import clean_text  # noqa: E402
from captioning.train import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall-clock budget")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.monotonic()

    manifests = synthetic.generate(out / "data", {"train": args.train, "val": args.val, "test": args.test},
                                   seed=args.seed, progress=False)
    config = TrainConfig(
        model=ModelConfig(max_length=20, d_model=128, num_layers=2, num_heads=2, dropout=0.1),
        weights="none", epochs=1000, batch_size=64, learning_rate=1e-3, patience=4, seed=args.seed,
        max_seconds=args.budget_minutes * 60, cache_dir=str(out / "feature-cache"),
    )
    train_manifest = read_manifest(manifests["train"])
    result = train(train_manifest, read_manifest(manifests["val"]), out / "model", config, progress=False)
    train_seconds = time.monotonic() - started
    bundle = load_bundle(out / "model")
    test = read_manifest(manifests["test"])
    report = evaluate(bundle, test, log=print)
    refs = {ex.id: list(ex.captions) for ex in test.examples}

    # Baseline 1: the most common training caption, for every image.
    common = collections.Counter(clean_text([c for ex in train_manifest.examples for c in ex.captions]))
    most_common = common.most_common(1)[0][0]
    baseline_common = corpus_scores(refs, {i: most_common for i in refs})

    # Baseline 2: nearest training image by feature distance (the features the captioner itself sees).
    train_feats = _unit(_features(bundle.backbone, [ex.image for ex in train_manifest.examples]))
    test_feats = _unit(_features(bundle.backbone, [ex.image for ex in test.examples]))
    nearest = (test_feats @ train_feats.T).argmax(axis=1)
    baseline_nn = corpus_scores(
        refs, {ex.id: train_manifest.examples[j].captions[0] for ex, j in zip(test.examples, nearest)})

    rows = {"captioner": report["scores"], "nearest-neighbour": baseline_nn, "most-common": baseline_common}
    print(f"\nsynthetic scenes: {args.train} train / {args.val} val / {args.test} test images, seed {args.seed}")
    print(f"captioner: {len(result.history)} epochs, {train_seconds / 60:.1f} min including data generation and "
          f"feature caching "
          f"(budget {args.budget_minutes:g} min, best epoch {result.best_epoch}), "
          f"{os.cpu_count()} CPU cores, random-init backbone (weights=none)")
    print(f"most common training caption: {most_common!r}\n")
    print(f"{'system':<20}{'BLEU-1':>8}{'BLEU-2':>8}{'BLEU-3':>8}{'BLEU-4':>8}{'CIDEr':>8}{'METEOR':>8}")
    for name, s in rows.items():
        meteor = f"{s['meteor']:.3f}" if s.get("meteor") is not None else "n/a"
        print(f"{name:<20}{s['bleu1']:>8.3f}{s['bleu2']:>8.3f}{s['bleu3']:>8.3f}{s['bleu4']:>8.3f}"
              f"{s['cider']:>8.3f}{meteor:>8}")
    beats = all(rows["captioner"][m] > max(rows["nearest-neighbour"][m], rows["most-common"][m])
                for m in ("bleu4", "cider"))
    print(f"\ncaptioner beats both baselines on BLEU-4 and CIDEr: {'yes' if beats else 'NO'}")
    (out / "results.json").write_text(json.dumps({"scores": rows, "epochs": len(result.history),
                                                  "train_seconds": train_seconds, "args": vars(args)}, indent=2))
    print(format_scores(rows["captioner"]))
    return 0 if beats else 1


def _features(backbone, images: list[str], batch: int = 64) -> np.ndarray:
    """Flattened backbone features (N, 49*C) of image files, a batch at a time."""
    from captioning.config import ImageConfig  # noqa: PLC0415
    from captioning.images import load_image  # noqa: PLC0415

    out = []
    for start in range(0, len(images), batch):
        pixels = np.stack([load_image(path, ImageConfig()) for path in images[start : start + batch]])
        out.append(backbone(pixels).numpy().reshape(len(pixels), -1))
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


if __name__ == "__main__":
    sys.exit(main())
