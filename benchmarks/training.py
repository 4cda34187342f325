"""Training benchmark: one process against Ray Train with 1 and 2 workers, on N and 4N feature shards, in one run.

Each row is a fresh process (so peak memory is that run's own), trained with the same data, seed and budget
(so the best validation losses should agree): `captioning train` in-process, or on Ray
Train (`--workers`), over feature sets made once up front. Printed per row: examples/s and step time of
the last epoch (the first one traces), seconds from the command to the first finished step, and peak RSS
of the training process (rank 0's, for Ray; workers are alike).

Targets: 1 Ray worker at >= 85% of one process's examples/s; peak RSS flat (within 15%) from N to 4N
shards. 2 workers on a 2-core machine share the cores with each other: reported as measured.

    python benchmarks/training.py                 # N = 8 shards of 32 images (4N = 32 shards)
    python benchmarks/training.py --shards 4 --shard-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = ["--d-model", "128", "--layers", "2", "--heads", "2", "--vocab-size", "200", "--max-length", "24"]


def make_feature_sets(root: Path, shards: int, shard_size: int) -> dict[str, str]:
    """Synthetic scenes and their feature sets: train with N and 4N shards, one validation set."""
    from captioning.datasets import synthetic  # noqa: PLC0415
    from captioning.featureset import FeaturesConfig, extract_features  # noqa: PLC0415

    data = synthetic.generate(root / "data", {"train": 4 * shards * shard_size, "val": 2 * shard_size}, seed=3,
                              progress=False)
    lines = data["train"].read_text().splitlines(keepends=True)
    (root / "train-n.jsonl").write_text("".join(lines[: shards * shard_size]).replace(
        '"images/', f'"{data["train"].parent}/images/'))
    sets = {}
    for name, manifest in (("n", root / "train-n.jsonl"), ("4n", data["train"]), ("val", data["val"])):
        config = FeaturesConfig.reading_own_kind(str(manifest), str(root / f"features-{name}"), weights="none",
                                                 shard_size=shard_size)
        extract_features(config, log=lambda _: None, progress=False)
        sets[name] = str(root / f"features-{name}")
    return sets


def one_run(train_set: str, val_set: str, out: Path, workers: int, epochs: int, batch: int) -> dict:
    """One `captioning train` in a fresh process; the last epoch's figures and the start-up time."""
    command = [sys.executable, "-m", "cli", "train", "--train", train_set, "--val", val_set,
               "--out", str(out), "--weights", "none", "--epochs", str(epochs), "--batch-size", str(batch),
               "--patience", str(epochs), "--no-progress", *MODEL, "--workers", str(workers)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    history = json.loads((out / "history.json").read_text())
    last = history[-1]
    return {"examples_per_second": last["examples_per_second"], "step_ms": 1000 * last["step_seconds"],
            "first_step_seconds": history[0]["first_step_at"] - started,
            "peak_rss_mb": max(row["peak_rss_mb"] for row in history), "total_seconds": time.time() - started,
            "best_val_loss": min(row["val_loss"] for row in history)}


def main() -> None:
    """Make the feature sets, run every row, print the table against the one-process baseline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="N: shards of the smaller training set")
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        print(f"making feature sets: N = {args.shards} and 4N = {4 * args.shards} shards of {args.shard_size} "
              "images (synthetic scenes, weights=none)", flush=True)
        sets = make_feature_sets(root, args.shards, args.shard_size)
        rows = []
        for label, workers, shards in (("one process", 0, "n"), ("one process", 0, "4n"), ("Ray, 1 worker", 1, "n"),
                                       ("Ray, 1 worker", 1, "4n"), ("Ray, 2 workers", 2, "n"),
                                       ("Ray, 2 workers", 2, "4n")):
            print(f"running {label} on {shards.upper()} shards ...", flush=True)
            figures = one_run(sets[shards], sets["val"], root / f"out-{workers}-{shards}", workers, args.epochs,
                              args.batch_size)
            rows.append((label, shards, figures))
    base = {shards: figures for label, shards, figures in rows if label == "one process"}
    print(f"\n{os.cpu_count()} CPU cores, no GPU; global batch {args.batch_size}; figures of epoch {args.epochs} "
          f"of {args.epochs}")
    print(f"{'path':<16}{'shards':>7}{'examples/s':>12}{'vs 1 proc':>10}{'step ms':>9}{'first step s':>14}"
          f"{'peak RSS MB':>13}{'best val_loss':>15}")
    for label, shards, f in rows:
        ratio = f["examples_per_second"] / base[shards]["examples_per_second"]
        count = args.shards * (4 if shards == "4n" else 1)
        print(f"{label:<16}{count:>7}{f['examples_per_second']:>12.0f}{ratio:>9.0%} {f['step_ms']:>8.1f}"
              f"{f['first_step_seconds']:>14.1f}{f['peak_rss_mb']:>13.0f}{f['best_val_loss']:>15.4f}")
    by = {(label, shards): f for label, shards, f in rows}
    one = by[("Ray, 1 worker", "n")]["examples_per_second"] / base["n"]["examples_per_second"]
    print(f"\n1 Ray worker / one process: {one:.0%} of examples/s (target >= 85%): "
          + ("met" if one >= 0.85 else "NOT met"))
    for label in ("one process", "Ray, 1 worker", "Ray, 2 workers"):
        growth = by[(label, "4n")]["peak_rss_mb"] / by[(label, "n")]["peak_rss_mb"] - 1
        print(f"peak RSS {label}, N -> 4N shards: {growth:+.0%} (target within 15%): "
              + ("met" if abs(growth) <= 0.15 else "NOT met"))


if __name__ == "__main__":
    main()
