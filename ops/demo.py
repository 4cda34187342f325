"""The main job on embedded defaults: synthetic data -> train -> caption -> evaluate -> bulk job over loopback URLs."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from captioning.atomic import atomic_write
from captioning.bulk import BulkConfig
from captioning.bundle import load_bundle
from captioning.config import FetchConfig, GenerationConfig, ModelConfig, TrainConfig
from captioning.datasets import synthetic
from captioning.evaluate import evaluate, format_scores
from captioning.inference import caption_sources
from captioning.manifest import ManifestSpec, read_manifest
from captioning.plots import plot_attention
from captioning.train import train
from jobs.batch import run as run_batch

# Small enough to train in minutes on two CPU cores. "none" is a seeded random backbone: the
# embedded default must run offline; pass real ImageNet weights for real data.
DEMO_CONFIG = TrainConfig(
    model=ModelConfig(max_length=20, d_model=128, num_layers=2, num_heads=2, dropout=0.1),
    weights="none", batch_size=64, learning_rate=1e-3, patience=3,
)


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the held-out images without a log line per request (the progress bar says enough)."""

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def run_demo(out: Path, n_train: int, n_val: int, n_test: int, epochs: int, seed: int,
             log: Callable[[str], None] = print, plots: int = 4) -> dict:
    """Run every stage, writing data/, model/, attention/, report.json and bulk/ under out; returns the report."""
    log(f"1/5 synthetic data in {out / 'data'}")
    manifests = synthetic.generate(out / "data", {"train": n_train, "val": n_val, "test": n_test}, seed=seed)
    log("2/5 training")
    config = TrainConfig(**{**DEMO_CONFIG.__dict__, "epochs": epochs, "seed": seed})
    train(read_manifest(manifests["train"]), read_manifest(manifests["val"]), out / "model", config, log=log)
    bundle = load_bundle(out / "model")
    test = read_manifest(manifests["test"])
    log(f"3/5 captioning {plots} held-out images with attention plots in {out / 'attention'}")
    (out / "attention").mkdir(exist_ok=True)
    sample = test.examples[:plots]
    results = caption_sources(bundle, [ex.image for ex in sample], GenerationConfig(), keep_images=True)
    for ex, result in zip(sample, results):
        path = out / "attention" / f"{Path(ex.image).stem}.png"
        plot_attention(result.image, result.caption.split(), result.attention, path, result.caption)
        log(f"  {Path(ex.image).name}: {result.caption!r}  (reference: {ex.captions[0]!r}) -> {path}")
    log("4/5 evaluation on the held-out test split")
    report = evaluate(bundle, test, log=log)
    atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    log(format_scores(report["scores"]))
    log(f"report: {out / 'report.json'}; training curves: {out / 'model' / 'training_curves.png'}")
    log("5/5 bulk job: the held-out images as URLs on a loopback server -> local Ray -> Parquet shards")
    bulk_captions(out, manifests["test"], log)
    return report


def bulk_captions(out: Path, test_manifest: Path, log: Callable[[str], None]) -> dict:
    """Serve the test images over HTTP on 127.0.0.1 and caption them with the bulk job into out/bulk."""
    handler = functools.partial(QuietHandler, directory=str(test_manifest.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows = [json.loads(line) for line in test_manifest.read_text().splitlines()]
        base = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = out / "bulk-manifest.csv"
        # The server's port differs per run, so each demo run is a new plan: start its output afresh.
        shutil.rmtree(out / "bulk", ignore_errors=True)
        atomic_write(manifest, ("url,caption\n" + "".join(f"{base}/{r['image']},{r['caption'][0]}\n"
                                                        for r in rows)).encode())
        config = BulkConfig(str(manifest), str(out / "model"), str(out / "bulk"), ManifestSpec(image_column="url"),
                            shard_size=64, attention_png=4,
                            fetch=FetchConfig(allowed_networks=("127.0.0.1/32",)))  # the demo's own server only
        summary = run_batch(config, log=log)
    finally:
        server.shutdown()
    log(f"bulk output: {out / 'bulk'}/captions/*.parquet, attention/*.npy, attention-png/, _SUCCESS.json")
    return summary
