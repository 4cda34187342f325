"""Bulk-job benchmark: N images served from loopback, end to end into SeaweedFS, against the ceiling and a baseline.

In one run, on the same model and images:
  * ceiling  - backbone-only images/s (MobileNetV3Small forward alone, batch 128, images already decoded);
  * baseline - seed-style: sequential download, one image at a time, full-recompute generation (a subset);
  * the job  - `jobs.batch.run` on local Ray at N=1,000 and N=5,000, output to a SeaweedFS bucket,
               with the peak resident memory of all processes (driver + Ray workers) for each N;
  * stages   - per-row fetch and inference seconds from the output, to say what bounds the pipeline.

  * faults   - the job at N=--fault-size with 0%, 5% and 25% of storage requests failing (half `503 SlowDown`,
               half connections dropped without an answer, by a proxy in front of SeaweedFS): rows/s, and
               every row exactly once.

    python benchmarks/bulk.py                   # N = 1000 and 5000
    python benchmarks/bulk.py --sizes 200 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from captioning import console  # noqa: E402

console.setup("warning")  # TensorFlow's start-up lines hidden; the figures below are the output

import numpy as np  # noqa: E402

from captioning.bulk import BulkConfig, read_output  # noqa: E402
from captioning.bundle import load_bundle  # noqa: E402
from captioning.config import FetchConfig, ImageConfig  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from captioning.fetch import Fetcher  # noqa: E402
from captioning.images import decode_image  # noqa: E402
from captioning.manifest import ManifestSpec, read_manifest  # noqa: E402
from ops.seaweed import SeaweedServer  # noqa: E402
from captioning.storage import Storage  # noqa: E402
from ops.demo import DEMO_CONFIG  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generation import seed_style_caption  # noqa: E402

from tests.faults import FaultProxy  # noqa: E402

LOOPBACK = FetchConfig(allowed_networks=("127.0.0.1/32",))


def process_tree(root: int) -> dict[int, tuple[str, float]]:
    """(command line, CPU seconds) of a process and all its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            fields = stat[stat.rindex(")") + 2 :].split()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry)] = int(fields[1])
            info[int(entry)] = (cmdline.strip(), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {pid: info[pid] for pid in tree if pid in info}


def group(pid: int, cmdline: str) -> str:
    """Which part of the benchmark a process belongs to."""
    if pid == os.getpid():
        return "driver (job driver + this benchmark's own TensorFlow)"
    if "weed" in cmdline.split(" ", 1)[0]:
        return "SeaweedFS"
    if "http.server" in cmdline:
        return "image server"
    return "Ray (workers, actors, raylet, GCS)"


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages (Ray's object store) counted once across processes."""
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_by_process(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two process_tree snapshots, summed by process name."""
    spent: dict[str, float] = {}
    for pid, (cmdline, cpu) in after.items():
        name = cmdline[:48]
        spent[name] = spent.get(name, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


class PeakMemory:
    """Samples, every 2 s, the summed PSS of this process and its descendants, in total and by group."""

    def __init__(self) -> None:
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            groups: dict[str, int] = {}
            for pid, (cmdline, _) in process_tree(os.getpid()).items():
                name = group(pid, cmdline)
                groups[name] = groups.get(name, 0) + pss(pid)
            self.peak = max(self.peak, sum(groups.values()))
            for name, size in groups.items():
                self.peaks[name] = max(self.peaks.get(name, 0), size)
            time.sleep(2.0)  # reading /proc costs ~40 ms of CPU: sample gently

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# A quiet keep-alive static file server, in its own process so its CPU shows apart from the job's driver.
IMAGE_SERVER = """
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """Start the image server on a free loopback port; returns the process and its base URL."""
    process = subprocess.Popen([sys.executable, "-c", IMAGE_SERVER, str(folder)], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-bulk")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--baseline-images", type=int, default=200)
    parser.add_argument("--model", default=None, help="bundle (default: train a small one first)")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--inference-threads", type=int, default=None)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--faults", type=float, nargs="*", default=[0.0, 0.05, 0.25],
                        help="shares of storage requests that fail, one run each (none: skip the faults table)")
    parser.add_argument("--fault-size", type=int, default=1000, help="rows per faults run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    biggest = max(args.sizes)
    data = synthetic.generate(out / "data", {"train": 1200, "val": 100, "test": biggest}, progress=False)
    if args.model is None:
        from captioning.train import train  # noqa: PLC0415

        config = DEMO_CONFIG.__class__(**{**DEMO_CONFIG.__dict__, "epochs": 4, "cache_dir": str(out / "cache")})
        train(read_manifest(data["train"]), read_manifest(data["val"]), out / "model", config, progress=False,
              log=lambda _: None)
    model = args.model or str(out / "model")
    bundle = load_bundle(model)
    server, base = serve(data["test"].parent)
    examples = read_manifest(data["test"]).examples
    urls = [f"{base}/{Path(ex.image).relative_to(data['test'].parent).as_posix()}" for ex in examples]

    # Ceiling: backbone only, on images already decoded, at its fastest batch size (best of three passes each).
    images = np.stack([decode_image(Path(ex.image).read_bytes(), ex.image, ImageConfig()) for ex in examples[:512]])
    sweep = {}
    for batch in (16, 32, 64, 128):
        bundle.backbone(images[:batch])
        for _ in range(3):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                bundle.backbone(images[i : i + batch])
            sweep[batch] = max(sweep.get(batch, 0.0), len(images) / (time.perf_counter() - start))
    ceiling = max(sweep.values())
    print("backbone only, images/s by batch size: " + ", ".join(f"{b}: {r:.0f}" for b, r in sweep.items()),
          flush=True)

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
        # A fresh local Ray, never the cluster this machine last recorded (which may be long gone).
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        storage = Storage(client=seaweed.client())
        for size in sorted(args.sizes):
            manifest = out / f"manifest-{size}.csv"
            manifest.write_text("url\n" + "".join(f"{u}\n" for u in urls[:size]))
            config = BulkConfig(str(manifest), model, f"s3://bench/run-{size}-{int(time.time())}",
                                ManifestSpec(image_column="url"), shard_size=256, fetch=LOOPBACK,
                                batch_size=args.batch_size, actors=args.actors,
                                inference_threads=args.inference_threads, actor_cpus=args.actor_cpus)
            cpu_before = process_tree(os.getpid())
            with PeakMemory() as memory:
                start = time.perf_counter()
                summary = run(config, log=lambda _: None, progress=False)
                seconds = time.perf_counter() - start
            cpu = cpu_by_process(cpu_before, process_tree(os.getpid()))
            print("CPU seconds by process: " + ", ".join(f"{k!r} {v:.1f}" for k, v in cpu.items() if v > 0.5))
            ok = sum(r["status"] == "ok" for r in read_output(config.output, storage))
            stages = summary["stages"]
            results.append({"n": size, "images_per_s": size / seconds, "seconds": seconds,
                            "peak_pss_mib": memory.peak / 2**20,
                            "peak_pss_mib_by_group": {k: v / 2**20 for k, v in memory.peaks.items()}, "ok": ok, "stages": stages, "cpu_seconds": cpu})
            r = results[-1]
            print(f"N={size}: {r['images_per_s']:.1f} images/s end to end ({seconds:.0f} s, {ok} ok), "
                  f"{r['images_per_s'] / ceiling:.0%} of the ceiling, {r['images_per_s'] / baseline:.1f}x the "
                  f"baseline; peak memory (PSS) {r['peak_pss_mib']:.0f} MiB: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_pss_mib_by_group"].items()), flush=True)
            print(f"  start-up {stages['startup_seconds']:.1f} s ({stages['startup_before_actors_seconds']:.1f} s "
                  f"before the actors started, {stages['actor_init_seconds']:.1f} s loading and tracing the model), then {stages['steady_images_per_second']:.1f} "
                  f"images/s ({stages['steady_images_per_second'] / ceiling:.0%} of the ceiling); ms per image: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in stages["ms_per_image"].items())
                  + f" (fetch: latency, {config.fetch_threads} in flight per task)", flush=True)
            print(f"  bound by {stages['bound_by']}: {stages['why']}", flush=True)
        faults = fault_table(args, model, urls, out, seaweed, storage)
        ray.shutdown()
    server.terminate()
    last = results[-1]
    print(f"target >= 70% of the ceiling: {'met' if last['images_per_s'] >= 0.7 * ceiling else 'NOT met'}; "
          f"target >= 20x the baseline: {'met' if last['images_per_s'] >= 20 * baseline else 'NOT met'}")
    (out / "results.json").write_text(json.dumps({"ceiling": ceiling, "baseline": baseline, "runs": results,
                                                  "faults": faults}, indent=2))
    return 0


def fault_table(args: argparse.Namespace, model: str, urls: list[str], out: Path, seaweed: SeaweedServer,
                storage: Storage) -> list[dict]:
    """The job through a fault-injecting proxy, one run per fault share, measured in the same run."""
    from captioning.config import StorageConfig  # noqa: PLC0415
    from jobs.batch import run  # noqa: PLC0415

    size = min(args.fault_size, len(urls))
    manifest = out / f"manifest-faults-{size}.csv"
    manifest.write_text("url\n" + "".join(f"{u}\n" for u in urls[:size]))
    rows = []
    for share in args.faults:
        proxy = FaultProxy(seaweed.endpoint, slowdown=share / 2, drop=share / 2, seed=1)
        try:
            config = BulkConfig(str(manifest), model, f"s3://bench/faults-{share:g}-{int(time.time())}",
                                ManifestSpec(image_column="url"), shard_size=100, fetch=LOOPBACK,
                                batch_size=args.batch_size, actors=args.actors, actor_cpus=args.actor_cpus,
                                storage=StorageConfig(s3_endpoint=proxy.endpoint))
            start = time.perf_counter()
            run(config, log=lambda _: None, progress=False)
            seconds = time.perf_counter() - start
        finally:
            proxy.close()
        ids = [r["row"] for r in read_output(config.output, storage)]
        failed = proxy.counts["slowdown"] + proxy.counts["dropped"]
        rows.append({"share": share, "rows_per_s": size / seconds, "seconds": seconds, "requests": sum(proxy.counts.values()),
                     "failed_requests": failed, "rows": len(ids), "exactly_once": len(ids) == len(set(ids)) == size})
    base = rows[0]["rows_per_s"] if rows else 0
    print(f"storage faults, N={size} (half 503 SlowDown, half dropped connections):")
    for r in rows:
        print(f"  {r['share']:>4.0%} of requests failing ({r['failed_requests']} of {r['requests']}): "
              f"{r['rows_per_s']:.1f} rows/s ({r['rows_per_s'] / base:.0%} of the run without faults), "
              f"{r['rows']} rows, exactly once: {'yes' if r['exactly_once'] else 'NO'}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
