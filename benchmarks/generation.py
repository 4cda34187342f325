"""Generation benchmark: the seed-style loop against the batched, KV-cached, compiled Generator, in one run.

Rows (same model, same images):
  * baseline  - the design's `simple_gen`: one image at a time, backbone once, then the whole decoder is
                rerun eagerly over the whole prefix for every new word (kept here only, as the baseline);
  * greedy / beam 3, batch 1, 32, 128, 512, with and without attention maps - the library's Generator.
Also: backbone-only images/s (MobileNetV3Small forward alone, the ceiling), end-to-end captions/s,
peak memory at batch 512, and how often each Generator traced (should be once).

    python benchmarks/generation.py                # trains a small model on synthetic scenes first
    python benchmarks/generation.py --model DIR    # or uses an existing bundle
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from captioning.bundle import Bundle, load_bundle  # noqa: E402
from captioning.config import ImageConfig  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from ops.demo import DEMO_CONFIG  # noqa: E402
from captioning.generate import GenerationConfig, Generator  # noqa: E402
from captioning.images import load_image  # noqa: E402
from captioning.manifest import read_manifest  # noqa: E402
from captioning.train import train  # noqa: E402

BATCHES = (1, 32, 128, 512)


def seed_style_caption(bundle: Bundle, image: np.ndarray) -> str:
    """The seed design's simple_gen (greedy): full recompute of the decoder for every word, batch of one."""
    model = bundle.model
    features = bundle.backbone(image[np.newaxis])
    tokens = tf.constant([[model.start_id]], tf.int64)
    for _ in range(model.config.max_length - 1):
        logits = model((features, tokens))[:, -1, :]  # eager, the whole prefix every time
        token = tf.argmax(logits, axis=-1)[:, tf.newaxis]
        tokens = tf.concat([tokens, token], axis=1)
        if int(token[0, 0]) == model.end_id:
            break
    return model.tokenizer.decode(tokens[:, 1:].numpy())[0]


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since last reset) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def reset_peak() -> None:
    """Reset VmHWM so the next peak belongs to the next measurement (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn, items: int) -> float:
    start = time.perf_counter()
    fn()
    return items / (time.perf_counter() - start)


def print_row(r: dict, baseline_rate: float) -> None:
    print(f"{r['method']:<8}{'yes' if r['attention'] else 'no':<6}{r['batch']:>6}"
          f"{r['decoder_captions_per_s']:>15.1f}{r['decoder_captions_per_s'] / baseline_rate:>12.1f}"
          f"{r['end_to_end_captions_per_s']:>18.1f}{r['end_to_end_captions_per_s'] / baseline_rate:>12.1f}"
          f"{r['peak_extra_mib']:>11.0f}{r['traces']:>8}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundle to use (default: train a small one first)")
    parser.add_argument("--out", default="runs/bench-generation")
    parser.add_argument("--images", type=int, default=1024, help="images per batched measurement")
    parser.add_argument("--small-batch-images", type=int, default=64, help="images for batch size 1")
    parser.add_argument("--baseline-images", type=int, default=24)
    args = parser.parse_args()
    out = Path(args.out)

    data = synthetic.generate(out / "data", {"train": 1200, "val": 100, "test": args.images}, progress=False)
    if args.model is None:
        config = DEMO_CONFIG.__class__(**{**DEMO_CONFIG.__dict__, "epochs": 4, "cache_dir": str(out / "cache")})
        train(read_manifest(data["train"]), read_manifest(data["val"]), out / "model", config, progress=False,
              log=lambda _: None)
    bundle = load_bundle(args.model or out / "model")
    images = np.stack([load_image(ex.image, ImageConfig()) for ex in read_manifest(data["test"]).examples])
    print(f"model {bundle.version}: d_model {bundle.model.config.d_model}, {bundle.model.config.num_layers} layers, "
          f"vocabulary {bundle.model.tokenizer.size}, max length {bundle.model.config.max_length}; "
          f"{len(images)} images; {os.cpu_count()} CPU cores; GPUs: {len(tf.config.list_physical_devices('GPU'))}")

    # Ceiling: the backbone alone.
    bundle.backbone(images[:128])
    backbone_rate = timed(lambda: [bundle.backbone(images[i : i + 128]) for i in range(0, len(images), 128)],
                          len(images))
    features = np.concatenate([bundle.backbone(images[i : i + 128]).numpy() for i in range(0, len(images), 128)])

    # Baseline: seed-style, end to end (it computes its own features).
    seed_style_caption(bundle, images[0])
    n = args.baseline_images
    baseline_rate = timed(lambda: [seed_style_caption(bundle, images[i]) for i in range(n)], n)

    print(f"\nbackbone only (MobileNetV3Small, batch 128): {backbone_rate:8.1f} images/s  <- ceiling")
    print(f"seed-style baseline (batch 1, full recompute per word): {baseline_rate:8.2f} captions/s "
          f"(on {n} images)\n")
    print(f"{'method':<8}{'attn':<6}{'batch':>6}{'decoder cap/s':>15}{'x baseline':>12}{'end-to-end cap/s':>18}"
          f"{'x baseline':>12}{'peak +MiB':>11}{'traces':>8}", flush=True)
    rows = []
    for method in ("greedy", "beam"):
        for attention in (False, True):
            config = GenerationConfig(method, beam_size=3, attention=attention)
            generator = Generator(bundle.model, config)
            for batch in BATCHES:
                count = args.small_batch_images if batch == 1 else len(images)
                generator(features[:batch])  # compile (traced once per Generator, not per batch size)
                reset_peak()
                before = rss_kib("VmRSS")

                def decode(batch=batch, count=count, generator=generator):
                    for i in range(0, count, batch):
                        generator(features[i : i + batch])

                def end_to_end(batch=batch, count=count, generator=generator):
                    for i in range(0, count, batch):
                        generator(bundle.backbone(images[i : i + batch]))

                decode_rate = timed(decode, count)
                peak_mib = (rss_kib("VmHWM") - before) / 1024
                e2e_rate = timed(end_to_end, count)
                rows.append({"method": "beam 3" if method == "beam" else "greedy", "attention": attention,
                             "batch": batch, "decoder_captions_per_s": decode_rate,
                             "end_to_end_captions_per_s": e2e_rate, "peak_extra_mib": peak_mib,
                             "traces": generator.traces})
                print_row(rows[-1], baseline_rate)

    key = next(r for r in rows if r["method"] == "greedy" and not r["attention"] and r["batch"] == 128)
    speedup = key["end_to_end_captions_per_s"] / baseline_rate
    share = key["end_to_end_captions_per_s"] / backbone_rate
    print(f"\ntarget 1: greedy, batch 128, end to end = {speedup:.1f}x the baseline (target >= 30x): "
          f"{'met' if speedup >= 30 else 'NOT met'}")
    print(f"target 2: end-to-end captions/s = {share:.2f} of backbone-only images/s (target >= 0.5): "
          f"{'met' if share >= 0.5 else 'NOT met'}")
    print(f"traced once per generator: {'yes' if all(r['traces'] == 1 for r in rows) else 'NO'}")
    (out / "results.json").write_text(json.dumps({"backbone_images_per_s": backbone_rate,
                                                  "baseline_captions_per_s": baseline_rate, "rows": rows}, indent=2))
    return 0 if speedup >= 30 and share >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
