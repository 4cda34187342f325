"""The main job on embedded defaults: synthetic data -> train -> caption with attention plots -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from captioning.bundle import load_bundle
from captioning.config import ModelConfig, TrainConfig
from captioning.datasets import synthetic
from captioning.evaluate import evaluate, format_scores
from captioning.generate import GenerationConfig
from captioning.inference import caption_sources
from captioning.manifest import read_manifest
from captioning.plots import plot_attention
from captioning.train import train

# Small enough to train in minutes on two CPU cores. "none" is a seeded random backbone: the
# embedded default must run offline; pass real ImageNet weights for real data.
DEMO_CONFIG = TrainConfig(
    model=ModelConfig(max_length=20, d_model=128, num_layers=2, num_heads=2, dropout=0.1),
    weights="none", batch_size=64, learning_rate=1e-3, patience=3,
)


def run_demo(out: Path, n_train: int, n_val: int, n_test: int, epochs: int, seed: int,
             log: Callable[[str], None] = print, plots: int = 4) -> dict:
    """Run every stage, writing data/, model/, attention/ and report.json under out; returns the report."""
    log(f"1/4 synthetic data in {out / 'data'}")
    manifests = synthetic.generate(out / "data", {"train": n_train, "val": n_val, "test": n_test}, seed=seed)
    log("2/4 training")
    config = TrainConfig(**{**DEMO_CONFIG.__dict__, "epochs": epochs, "seed": seed})
    train(read_manifest(manifests["train"]), read_manifest(manifests["val"]), out / "model", config, log=log)
    bundle = load_bundle(out / "model")
    test = read_manifest(manifests["test"])
    log(f"3/4 captioning {plots} held-out images with attention plots in {out / 'attention'}")
    (out / "attention").mkdir(exist_ok=True)
    sample = test.examples[:plots]
    results = caption_sources(bundle, [ex.image for ex in sample], GenerationConfig(), keep_images=True)
    for ex, result in zip(sample, results):
        path = out / "attention" / f"{Path(ex.image).stem}.png"
        plot_attention(result.image, result.caption.split(), result.attention, path, result.caption)
        log(f"  {Path(ex.image).name}: {result.caption!r}  (reference: {ex.captions[0]!r}) -> {path}")
    log("4/4 evaluation on the held-out test split")
    report = evaluate(bundle, test, log=log)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(format_scores(report["scores"]))
    log(f"report: {out / 'report.json'}; training curves: {out / 'model' / 'training_curves.png'}")
    return report
