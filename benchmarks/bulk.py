"""Bulk-job benchmark: N images served from loopback, end to end into SeaweedFS, against the ceiling and a baseline.

In one run, on the same model and images:
  * ceiling  - backbone-only images/s (MobileNetV3Small forward alone, batch 128, images already decoded);
  * baseline - seed-style: sequential download, one image at a time, full-recompute generation (a subset);
  * the job  - `jobs.batch.run` on local Ray at N=1,000 and N=5,000, output to a SeaweedFS bucket,
               with the peak resident memory of all processes (driver + Ray workers) for each N;
  * stages   - per-row fetch and inference seconds from the output, to say what bounds the pipeline.

    python benchmarks/bulk.py                   # N = 1000 and 5000
    python benchmarks/bulk.py --sizes 200 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.bulk import BulkConfig, read_output  # noqa: E402
from captioning.bundle import load_bundle  # noqa: E402
from captioning.config import FetchConfig, ImageConfig  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from captioning.fetch import Fetcher  # noqa: E402
from captioning.images import decode_image  # noqa: E402
from captioning.manifest import ManifestSpec, read_manifest  # noqa: E402
from captioning.seaweed import SeaweedServer  # noqa: E402
from captioning.storage import Storage  # noqa: E402
from jobs.demo import DEMO_CONFIG  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import seed_style_caption  # noqa: E402

LOOPBACK = FetchConfig(allowed_networks=("127.0.0.1/32",))


def tree_rss(root: int) -> int:
    """Summed resident bytes of a process and all its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(rss.get(pid, 0) for pid in tree)


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's workers) every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.2)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def serve(folder: Path):  # noqa: ANN201
    import functools  # noqa: PLC0415
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-bulk")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--baseline-images", type=int, default=200)
    parser.add_argument("--model", default=None, help="bundle (default: train a small one first)")
    args = parser.parse_args()
    out = Path(args.out)
    biggest = max(args.sizes)
    data = synthetic.generate(out / "data", {"train": 1200, "val": 100, "test": biggest}, progress=False)
    if args.model is None:
        from captioning.train import train  # noqa: PLC0415

        config = DEMO_CONFIG.__class__(**{**DEMO_CONFIG.__dict__, "epochs": 4, "cache_dir": str(out / "cache")})
        train(read_manifest(data["train"]), read_manifest(data["val"]), out / "model", config, progress=False,
              log=lambda _: None)
    model = args.model or str(out / "model")
    bundle = load_bundle(model)
    server = serve(data["test"].parent)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    examples = read_manifest(data["test"]).examples
    urls = [f"{base}/{Path(ex.image).relative_to(data['test'].parent).as_posix()}" for ex in examples]

    # Ceiling: backbone only, on images already decoded.
    images = np.stack([decode_image(Path(ex.image).read_bytes(), ex.image, ImageConfig()) for ex in examples[:512]])
    bundle.backbone(images[:128])
    start = time.perf_counter()
    for i in range(0, len(images), 128):
        bundle.backbone(images[i : i + 128])
    ceiling = len(images) / (time.perf_counter() - start)

    # Baseline: sequential download, one image at a time, full-recompute generation.
    fetcher = Fetcher(LOOPBACK)
    n = args.baseline_images
    start = time.perf_counter()
    for url in urls[:n]:
        seed_style_caption(bundle, decode_image(fetcher.get(url).data, url, ImageConfig()))
    baseline = n / (time.perf_counter() - start)
    print(f"backbone only: {ceiling:.1f} images/s (ceiling); seed-style baseline: {baseline:.2f} images/s "
          f"on {n} images", flush=True)

    import ray  # noqa: PLC0415

    from jobs.batch import run  # noqa: PLC0415

    results = []
    with SeaweedServer(out / "seaweed") as seaweed:
        seaweed.create_bucket("bench")
        os.environ.update(seaweed.env())  # Ray workers inherit the credentials
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        storage = Storage(client=seaweed.client())
        for size in sorted(args.sizes):
            manifest = out / f"manifest-{size}.csv"
            manifest.write_text("url\n" + "".join(f"{u}\n" for u in urls[:size]))
            config = BulkConfig(str(manifest), model, f"s3://bench/run-{size}-{int(time.time())}",
                                ManifestSpec(image_column="url"), shard_size=256, batch_size=64, fetch=LOOPBACK)
            with PeakRSS() as rss:
                start = time.perf_counter()
                summary = run(config, log=lambda _: None, progress=False)
                seconds = time.perf_counter() - start
            rows = list(read_output(config.output, storage))
            fetch = float(np.mean([r["fetch_seconds"] for r in rows]))
            infer = float(np.mean([r["inference_seconds"] or 0 for r in rows]))
            results.append({"n": size, "images_per_s": size / seconds, "seconds": seconds,
                            "peak_rss_mib": rss.peak / 2**20, "ok": summary["statuses"].get("ok", 0),
                            "fetch_s_per_image": fetch, "inference_s_per_image": infer})
            r = results[-1]
            print(f"N={size}: {r['images_per_s']:.1f} images/s end to end ({r['seconds']:.0f} s, {r['ok']} ok), "
                  f"{r['images_per_s'] / ceiling:.0%} of the ceiling, {r['images_per_s'] / baseline:.1f}x the "
                  f"baseline; peak RSS {r['peak_rss_mib']:.0f} MiB; per image: fetch {fetch * 1000:.1f} ms "
                  f"(with {config.fetch_threads} in flight), inference {infer * 1000:.1f} ms", flush=True)
        ray.shutdown()
    server.shutdown()
    last = results[-1]
    bound = "inference (backbone + decoder)" if last["inference_s_per_image"] * 1 > last["fetch_s_per_image"] / 32 \
        else "fetch"
    print(f"\nbound by: {bound}")
    print(f"target >= 70% of the ceiling: {'met' if last['images_per_s'] >= 0.7 * ceiling else 'NOT met'}; "
          f"target >= 20x the baseline: {'met' if last['images_per_s'] >= 20 * baseline else 'NOT met'}")
    (out / "results.json").write_text(json.dumps({"ceiling": ceiling, "baseline": baseline, "runs": results},
                                                 indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
