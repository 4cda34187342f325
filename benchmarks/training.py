"""Training benchmark, in one run on the same data: today's loop against the new one, the batch size, and Ray Train.

1. The loop: the tutorial-size decoder (d_model 256, 2 layers, 2 heads, global batch 32) trained the same
   epochs on the same feature set three ways: today's loop (`--padding fixed --no-group-by-image --xla off`:
   every batch padded to --max-length, each caption projecting its own image), the new loop without XLA, and
   the new loop with XLA. Printed: pairs/s and step time of the last epoch, data wait as a share of the epoch,
   and the validation loss after the same epochs. Target: >= 1.7x today's pairs/s at equal or better
   validation loss (within 1%).
2. The batch: the new loop at global batches 32, 64 and 128, the learning rate scaled by the square root of
   the batch (1e-4 at 32); the best pairs/s whose validation loss after the same epochs is within 2% of
   batch 32's is the pick.
3. Ray Train: one process against Ray Train with 1 and 2 workers on N and 4N shards (d_model 128, batch 64).
   Target: 1 Ray worker at >= 85% of one process's pairs/s at both shard counts; peak RSS flat (within 15%)
   from N to 4N shards. 2 workers on a 2-core machine share the cores: reported as measured.

Each row is a fresh `captioning train` process (so peak memory is that run's own) with the same seed.

    python benchmarks/training.py                 # N = 8 shards of 32 images (4N = 32 shards)
    python benchmarks/training.py --shards 4 --shard-size 64 --skip-ray
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


LOOP_MODEL = ["--d-model", "256", "--layers", "2", "--heads", "2", "--vocab-size", "200", "--max-length", "32"]
TODAY = ["--padding", "fixed", "--no-group-by-image", "--xla", "off"]
LOOPS = (("today's loop", TODAY), ("new, no XLA", ["--xla", "off"]), ("new, XLA", ["--xla", "on"]))


def one_run(train_set: str, val_set: str, out: Path, workers: int, epochs: int, batch: int,
            extra: list[str] | None = None, model: list[str] = MODEL) -> dict:
    """One `captioning train` in a fresh process; the last epoch's figures and the start-up time."""
    command = [sys.executable, "-m", "cli", "train", "--train", train_set, "--val", val_set,
               "--out", str(out), "--weights", "none", "--epochs", str(epochs), "--batch-size", str(batch),
               "--patience", str(epochs), "--no-progress", *model, "--workers", str(workers), *(extra or [])]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    history = json.loads((out / "history.json").read_text())
    last = history[-1]
    return {"examples_per_second": last["examples_per_second"], "step_ms": 1000 * last["step_seconds"],
            "first_step_seconds": history[0]["first_step_at"] - started,
            "peak_rss_mb": max(row["peak_rss_mb"] for row in history), "total_seconds": time.time() - started,
            "best_val_loss": min(row["val_loss"] for row in history), "val_loss": last["val_loss"],
            "wait_share": last["input_wait_seconds"] / max(last["seconds"], 1e-9)}


def main() -> None:
    """Make the feature sets, run every row, print the table against the one-process baseline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="N: shards of the smaller training set")
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch of the Ray rows")
    parser.add_argument("--loop-epochs", type=int, default=5, help="epochs of the loop and batch rows")
    parser.add_argument("--skip-ray", action="store_true", help="only the loop and batch sections")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        print(f"making feature sets: N = {args.shards} and 4N = {4 * args.shards} shards of {args.shard_size} "
              "images (synthetic scenes, weights=none)", flush=True)
        sets = make_feature_sets(root, args.shards, args.shard_size)
        loops = loop_section(sets, root, args.loop_epochs)
        batches = batch_section(sets, root, args.loop_epochs)
        rows = []
        if args.skip_ray:
            print_loops(loops, batches, args)
            return
        for label, workers, shards in (("one process", 0, "n"), ("one process", 0, "4n"), ("Ray, 1 worker", 1, "n"),
                                       ("Ray, 1 worker", 1, "4n"), ("Ray, 2 workers", 2, "n"),
                                       ("Ray, 2 workers", 2, "4n")):
            print(f"running {label} on {shards.upper()} shards ...", flush=True)
            figures = one_run(sets[shards], sets["val"], root / f"out-{workers}-{shards}", workers, args.epochs,
                              args.batch_size)
            rows.append((label, shards, figures))
    print_loops(loops, batches, args)
    base = {shards: figures for label, shards, figures in rows if label == "one process"}
    print(f"\n{os.cpu_count()} CPU cores, no GPU; global batch {args.batch_size}; figures of epoch {args.epochs} "
          f"of {args.epochs}")
    print(f"{'path':<16}{'shards':>7}{'pairs/s':>12}{'vs 1 proc':>10}{'step ms':>9}{'data wait':>10}"
          f"{'first step s':>14}{'peak RSS MB':>13}{'best val_loss':>15}")
    for label, shards, f in rows:
        ratio = f["examples_per_second"] / base[shards]["examples_per_second"]
        count = args.shards * (4 if shards == "4n" else 1)
        print(f"{label:<16}{count:>7}{f['examples_per_second']:>12.0f}{ratio:>9.0%} {f['step_ms']:>8.1f}"
              f"{f['wait_share']:>10.1%}{f['first_step_seconds']:>14.1f}{f['peak_rss_mb']:>13.0f}{f['best_val_loss']:>15.4f}")
    by = {(label, shards): f for label, shards, f in rows}
    print()
    for shards in ("n", "4n"):
        one = by[("Ray, 1 worker", shards)]["examples_per_second"] / base[shards]["examples_per_second"]
        count = args.shards * (4 if shards == "4n" else 1)
        print(f"1 Ray worker / one process at {count} shards: {one:.0%} of pairs/s (target >= 85%): "
              + ("met" if one >= 0.85 else "NOT met"))
    ray_wait = max(f["wait_share"] for label, _, f in rows if label.startswith("Ray"))
    print(f"data wait per Ray worker: {ray_wait:.1%} of the epoch at most (target < 5%): "
          + ("met" if ray_wait < 0.05 else "NOT met"))
    for label in ("one process", "Ray, 1 worker", "Ray, 2 workers"):
        growth = by[(label, "4n")]["peak_rss_mb"] / by[(label, "n")]["peak_rss_mb"] - 1
        print(f"peak RSS {label}, N -> 4N shards: {growth:+.0%} (target within 15%): "
              + ("met" if abs(growth) <= 0.15 else "NOT met"))


def loop_section(sets: dict[str, str], root: Path, epochs: int) -> list[tuple[str, dict]]:
    """Today's loop and the new one (with and without XLA), one process, batch 32, on the 4N set."""
    rows = []
    for label, extra in LOOPS:
        print(f"running {label} (batch 32, {epochs} epochs) ...", flush=True)
        rows.append((label, one_run(sets["4n"], sets["val"], root / f"loop-{len(rows)}", 0, epochs, 32,
                                    extra, LOOP_MODEL)))
    return rows


def batch_section(sets: dict[str, str], root: Path, epochs: int) -> list[tuple[int, float, dict]]:
    """The new loop (default XLA setting) at batches 32, 64, 128 with the square-root learning-rate rule."""
    rows = []
    for batch in (32, 64, 128):
        rate = 1e-4 * (batch / 32) ** 0.5
        print(f"running the new loop at batch {batch}, learning rate {rate:.3g} ...", flush=True)
        rows.append((batch, rate, one_run(sets["4n"], sets["val"], root / f"batch-{batch}", 0, epochs, batch,
                                          ["--learning-rate", f"{rate:.6g}"], LOOP_MODEL)))
    return rows


def print_loops(loops: list[tuple[str, dict]], batches: list[tuple[int, float, dict]], args) -> None:
    """The loop and batch tables, with the targets."""
    print(f"\n{os.cpu_count()} CPU cores, no GPU; the loop: d_model 256, 2 layers, 2 heads, global batch 32, "
          f"{4 * args.shards} shards of {args.shard_size} images, figures of epoch {args.loop_epochs}")
    print(f"{'loop':<16}{'pairs/s':>9}{'vs today':>10}{'step ms':>9}{'data wait':>11}{'val_loss':>10}")
    today = loops[0][1]
    for label, f in loops:
        print(f"{label:<16}{f['examples_per_second']:>9.0f}{f['examples_per_second'] / today['examples_per_second']:>9.2f}x"
              f"{f['step_ms']:>9.1f}{f['wait_share']:>11.1%}{f['val_loss']:>10.4f}")
    best_label, best = max(loops[1:], key=lambda row: row[1]["examples_per_second"])
    speedup = best["examples_per_second"] / today["examples_per_second"]
    change = best["val_loss"] / today["val_loss"] - 1
    print(f"fastest new loop ({best_label}): {speedup:.2f}x today's pairs/s (target >= 1.7x), val_loss "
          f"{best['val_loss']:.4f} vs {today['val_loss']:.4f} ({change:+.1%}; equal: within 1%): "
          + ("met" if speedup >= 1.7 and change <= 0.01 else "NOT met"))
    waits = [f["wait_share"] for _, f in loops[1:]]
    print(f"data wait of the new loop: {max(waits):.1%} of the epoch at most (target < 5%): "
          + ("met" if max(waits) < 0.05 else "NOT met"))
    print(f"\n{'batch':>6}{'learning rate':>15}{'pairs/s':>9}{'step ms':>9}{'data wait':>11}{'val_loss':>10}")
    for batch, rate, f in batches:
        print(f"{batch:>6}{rate:>15.3g}{f['examples_per_second']:>9.0f}{f['step_ms']:>9.1f}{f['wait_share']:>11.1%}"
              f"{f['val_loss']:>10.4f}")
    reference = batches[0][2]["val_loss"]
    fair = [row for row in batches if row[2]["val_loss"] <= reference * 1.02]
    pick = max(fair, key=lambda row: row[2]["examples_per_second"])
    print(f"best batch at equal validation loss (within 2% of batch 32's after {args.loop_epochs} epochs): {pick[0]} "
          f"({pick[2]['examples_per_second']:.0f} pairs/s, learning rate {pick[1]:.3g})")
    today = loops[0][1]
    print(f"the new loop at batch {pick[0]} against today's at 32: "
          f"{pick[2]['examples_per_second'] / today['examples_per_second']:.2f}x pairs/s, val_loss "
          f"{pick[2]['val_loss']:.4f} vs {today['val_loss']:.4f} ({pick[2]['val_loss'] / today['val_loss'] - 1:+.1%})")


if __name__ == "__main__":
    main()
