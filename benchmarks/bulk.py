"""Bulk-job benchmark: images served from loopback, end to end into SeaweedFS, against its ceilings and its peer.

In one run, on the same model and images:
  * ceilings  - backbone only (MobileNetV3Small forward alone, images already decoded, best batch size), and the
                CPU budget: the cores divided by the core-ms per image of every stage of the job measured alone
                (benchmarks/costs.py: fetch, decode, backbone, decoder, payloads, write, and the servers);
  * baseline  - seed-style: sequential download, one image at a time, full-recompute generation (a subset);
  * the peer  - the pipeline Ray Data's batch-inference docs teach (benchmarks/recipe.py), alternating with the
                job on the same N images: both rates and their ratio;
  * the job   - `jobs.batch.run` on local Ray at each --sizes N, with CPU core-ms per image by process group
                (psutil: model actors, fetch/write tasks, the driver, Ray's own processes) and peak memory;
  * start-up  - the `captioning batch` command as a user types it (fresh local Ray): seconds from the command to
                its first captioned row, beside `import tensorflow` + loading the bundle alone (the floor);
  * faults    - the job at N=--fault-size with 0%, 5% and 25% of storage requests failing (half `503 SlowDown`,
                half connections dropped without an answer, by a proxy in front of SeaweedFS);
  * --big     - N=20,000: end to end against the CPU-budget ceiling, memory against N=5,000.
  * politeness - the job with its default politeness (the host ledger, robots.txt, the breaker) against the job with
                none, alternating at N=--politeness-size: every image is on one loopback host, so the per-host limit
                is raised to the job's own concurrency (fetch threads x fetch tasks); the cost per image in %.
                Every other run here uses that same raised limit.

    python benchmarks/bulk.py                        # N = 1000 and 5000, peer at 5000
    python benchmarks/bulk.py --sizes 500 --peer-size 1000 --faults   # quicker
    python benchmarks/bulk.py --big                  # and N = 20,000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from captioning import console  # noqa: E402

console.setup("warning")  # TensorFlow's start-up lines hidden; the figures below are the output

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from captioning.bulk import BulkConfig, read_output  # noqa: E402
from captioning.bundle import load_bundle  # noqa: E402
from captioning.config import FetchConfig, ImageConfig, PolitenessConfig  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from captioning.fetch import Fetcher  # noqa: E402
from captioning.images import decode_image  # noqa: E402
from captioning.manifest import ManifestSpec, read_manifest  # noqa: E402
from ops.seaweed import SeaweedServer  # noqa: E402
from captioning.storage import Storage  # noqa: E402
from ops.demo import DEMO_CONFIG  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from costs import ProcessCPU, Sampler, stage_costs  # noqa: E402
from generation import seed_style_caption  # noqa: E402
from recipe import run_recipe  # noqa: E402

from tests.faults import FaultProxy  # noqa: E402

LOOPBACK = FetchConfig(allowed_networks=("127.0.0.1/32",))
TASKS, LEDGER = "fetch and write tasks (Ray workers)", "host ledger (politeness)"
CORES = len(os.sched_getaffinity(0))


# A quiet keep-alive static file server, in its own process so its CPU shows apart from the job's driver.
IMAGE_SERVER = """
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK = 40 ms each
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """Start the image server on a free loopback port; returns the process and its base URL."""
    process = subprocess.Popen([sys.executable, "-c", IMAGE_SERVER, str(folder)], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}"


def raised_limit(args: argparse.Namespace) -> PolitenessConfig:
    """The default politeness, with the per-host limit at the job's own concurrency (one host serves it all)."""
    from captioning.shards import defaults  # noqa: PLC0415

    return PolitenessConfig(per_host_concurrency=defaults.FETCH_THREADS * defaults.FETCH_TASKS_PER_ACTOR * args.actors)


def job_config(manifest: Path, model: str, output: str, args: argparse.Namespace, **extra) -> BulkConfig:
    """The job as the benchmark runs it: defaults, but for loopback fetching, the raised per-host limit and the
    benchmark's knobs."""
    extra.setdefault("politeness", raised_limit(args))
    return BulkConfig(str(manifest), model, output, ManifestSpec(image_column="url"), fetch=LOOPBACK,
                      batch_size=args.batch_size, actors=args.actors, inference_threads=args.inference_threads,
                      actor_cpus=args.actor_cpus, **extra)


def politeness_cost(args: argparse.Namespace, model: str, urls: list[str], out: Path, cpu: ProcessCPU,
                    storage: Storage) -> dict:
    """The job with and without politeness, alternating on the same images: images/s and the cost per image."""
    size = min(args.politeness_size, len(urls))
    manifest = write_manifest(out, f"polite-{size}", urls[:size])
    none = PolitenessConfig(per_host_concurrency=0, ignore_robots_txt=True, breaker_failures=0)
    runs: dict[str, list[dict]] = {"polite": [], "none": []}
    for turn in range(args.politeness_runs):
        for name, rules in (("none", none), ("polite", raised_limit(args))):
            result = run_job(job_config(manifest, model, f"s3://bench/{name}-{size}-{int(time.time())}-{turn}", args,
                                        politeness=rules), cpu, storage)
            runs[name].append(result)
            print(f"politeness {name}, N={size}, run {turn + 1}: {result['images_per_s']:.1f} images/s end to end "
                  f"({result['seconds']:.0f} s), {result['stages']['steady_images_per_second']:.1f} steady; "
                  f"{sum(result['core_ms'].values()):.2f} core-ms per image, of which fetch and write tasks "
                  f"{result['core_ms'].get(TASKS, 0):.2f}, the host ledger {result['core_ms'].get(LEDGER, 0):.3f}",
                  flush=True)

    def mean(name: str, value) -> float:
        return float(np.mean([value(r) for r in runs[name]]))

    rate = {name: mean(name, lambda r: r["images_per_s"]) for name in runs}
    steady = {name: mean(name, lambda r: r["stages"]["steady_images_per_second"]) for name in runs}
    core_ms = {name: mean(name, lambda r: sum(r["core_ms"].values())) for name in runs}
    tasks = {name: mean(name, lambda r: r["core_ms"].get(TASKS, 0) + r["core_ms"].get(LEDGER, 0)) for name in runs}
    cost, steady_cost = 1 - rate["polite"] / rate["none"], 1 - steady["polite"] / steady["none"]
    print(f"the cost of politeness at N={size} over {args.politeness_runs} alternating runs each: end to end "
          f"{rate['polite']:.1f} vs {rate['none']:.1f} images/s = {cost:+.1%} of throughput, steady "
          f"{steady['polite']:.1f} vs {steady['none']:.1f} = {steady_cost:+.1%} (target < 5%); CPU "
          f"{core_ms['polite']:.2f} vs {core_ms['none']:.2f} core-ms per image in all, fetch tasks and ledger "
          f"{tasks['polite']:.2f} vs {tasks['none']:.2f}", flush=True)
    return {"n": size, "runs": runs, "images_per_s": rate, "steady_images_per_s": steady, "core_ms": core_ms,
            "fetch_core_ms": tasks, "throughput_cost": cost, "steady_cost": steady_cost}


def write_manifest(out: Path, name: str, urls: list[str]) -> Path:
    """A url-column CSV of urls."""
    path = out / f"manifest-{name}.csv"
    path.write_text("url\n" + "".join(f"{u}\n" for u in urls))
    return path


def run_job(config: BulkConfig, cpu: ProcessCPU, storage: Storage) -> dict:
    """The job once, with CPU by process group and peak memory sampled while it runs."""
    from jobs.batch import run  # noqa: PLC0415

    with Sampler(cpu) as sampler:
        start = time.perf_counter()
        summary = run(config, log=lambda _: None, progress=False)
        seconds = time.perf_counter() - start
    rows = list(read_output(config.output, storage))
    n = len(rows)
    return {"n": n, "seconds": seconds, "images_per_s": n / seconds, "stages": summary["stages"],
            "ok": sum(r["status"] == "ok" for r in rows), "exactly_once": len({r["row"] for r in rows}) == n,
            "attention": sum(r["attention_length"] is not None for r in rows),
            "core_ms": {k: 1000 * v / n for k, v in sampler.spent().items()}, "peak_pss_mib": sampler.peak_pss / 2**20,
            "pss_by_quarter_mib": sampler.pss_by_quarter()}


def print_job(label: str, r: dict, ceilings: dict) -> None:
    """One job run's lines: rate against the ceilings, start-up, stages, CPU by group, memory."""
    stages = r["stages"]
    print(f"{label}: {r['images_per_s']:.1f} images/s end to end ({r['seconds']:.0f} s, {r['ok']} ok, attention for "
          f"{r['attention']}, exactly once: {'yes' if r['exactly_once'] else 'NO'}); "
          f"{r['images_per_s'] / ceilings['cpu_budget']:.0%} of the CPU-budget ceiling; peak memory (PSS) "
          f"{r['peak_pss_mib']:.0f} MiB (by quarter of the run: "
          + " / ".join(f"{q:.0f}" for q in r["pss_by_quarter_mib"]) + ")", flush=True)
    print(f"  start-up {stages['startup_seconds']:.1f} s ({stages['startup_before_actors_seconds']:.1f} s before the "
          f"actor's model load, {stages['actor_init_seconds']:.1f} s loading and tracing it; first captions at "
          f"{stages['first_row_seconds']:.1f} s), then {stages['steady_images_per_second']:.1f} images/s steady, "
          f"caption actors busy {stages['caption_busy']:.0%}", flush=True)
    ms = stages["ms_per_image"]
    print("  wall ms per image in the job: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if "cpu" not in k)
          + " (fetch: latency summed over requests in flight)", flush=True)
    alone = ceilings["stage_core_ms"]["decode"]
    print(f"  the fetch threads' CPU per image in the job: fetch {ms['fetch_cpu']:.2f} core-ms, decode "
          f"{ms['decode_cpu']:.2f} = {ms['decode_cpu'] / alone:.2f}x its cost alone (target <= 1.5x: "
          f"{'met' if ms['decode_cpu'] <= 1.5 * alone else 'NOT met'})", flush=True)
    total = sum(r["core_ms"].values())
    print(f"  CPU core-ms per image by process ({total:.1f} in all, start-up included): "
          + ", ".join(f"{k} {v:.2f}" for k, v in r["core_ms"].items() if v >= 0.01), flush=True)


def measure_ceilings(args: argparse.Namespace, bundle, examples, urls: list[str], model: str, out: Path,
                     server: psutil.Process, seaweed: psutil.Process) -> dict:
    """Backbone-only ceiling (best batch size) and the CPU-budget ceiling (every stage alone, summed)."""
    images = np.stack([decode_image(Path(ex.image).read_bytes(), ex.image, ImageConfig()) for ex in examples[:512]])
    sweep = {}
    for batch in (16, 32, 64, 128):
        bundle.backbone(images[:batch])
        for _ in range(3):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                bundle.backbone(images[i : i + batch])
            sweep[batch] = max(sweep.get(batch, 0.0), len(images) / (time.perf_counter() - start))
    print("backbone only, images/s by batch size: " + ", ".join(f"{b}: {r:.0f}" for b, r in sweep.items()),
          flush=True)
    size = min(args.costs_size, len(urls))
    config = job_config(write_manifest(out, f"costs-{size}", urls[:size]), model,
                        f"s3://bench/costs-{int(time.time())}", args).resolved(Storage()).with_absolute_paths()
    stages, writers = stage_costs(config, server, seaweed)
    servers = ("image server", "SeaweedFS")
    job_own = sum(v for k, v in stages.items() if k not in servers)
    non_backbone = job_own - stages["backbone"]
    budget = CORES * 1000 / sum(stages.values())
    print(f"core-ms per image of each stage alone ({size} images, the job's code and batch size): "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)
    print(f"  the job's own {job_own:.2f} core-ms per image; non-backbone {non_backbone:.2f} = "
          f"{non_backbone / stages['backbone']:.2f}x the backbone's (target <= 0.5x: "
          f"{'met' if non_backbone <= 0.5 * stages['backbone'] else 'NOT met'})", flush=True)
    print("  writers by output format, core-ms per image with SeaweedFS: " + ", ".join(
        f"{k} {v:.2f} ({v / writers['Parquet']:.1f}x Parquet)" for k, v in writers.items()), flush=True)
    print(f"ceilings: backbone only {max(sweep.values()):.1f} images/s; CPU budget {budget:.1f} images/s "
          f"({CORES} cores / {sum(stages.values()):.2f} core-ms, the servers on the same cores included)", flush=True)
    return {"backbone_only": max(sweep.values()), "backbone_sweep": sweep, "cpu_budget": budget,
            "stage_core_ms": stages, "writer_core_ms": writers, "non_backbone_share": non_backbone / stages["backbone"]}


def measure_startup(model: str, urls: list[str], out: Path) -> dict:
    """The command as a user types it (its own fresh local Ray), timed to its first captioned row, beside the
    floor: a fresh Python importing TensorFlow and loading the bundle, nothing else."""
    floor_code = ("import time, sys; t = time.time(); import tensorflow; from captioning.bundle import load_bundle; "
                  "load_bundle(sys.argv[1]); print(time.time() - t)")
    floors = [float(subprocess.run([sys.executable, "-c", floor_code, model], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]) for _ in range(2)]
    manifest = write_manifest(out, "startup", urls[:256])
    output = out / f"startup-{int(time.time())}"
    command = [str(Path(sys.executable).parent / "captioning"), "batch", "--manifest", str(manifest), "--model", model,
               "--output", str(output), "--allow-network", "127.0.0.1/32", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    launched = time.time()
    subprocess.run(command, check=True, capture_output=True, env=env)
    done = time.time() - launched
    summary = json.loads((output / "_SUCCESS.json").read_text())
    first = summary["stages"]["first_row_at"] - launched
    print(f"start-up, local manifest: first captioned row {first:.1f} s after the command (target 8 s), all 256 rows "
          f"{done:.1f} s; floor (import tensorflow + load the bundle, alone) {min(floors):.1f} s", flush=True)
    return {"first_row_seconds": first, "command_seconds": done, "floor_seconds": min(floors)}


def compare_with_recipe(args: argparse.Namespace, model: str, urls: list[str], out: Path, seaweed: SeaweedServer,
                        cpu: ProcessCPU, storage: Storage, ceilings: dict) -> dict:
    """The docs recipe and the job, alternating, on the same N images."""
    size = min(args.peer_size, len(urls))
    manifest = write_manifest(out, f"peer-{size}", urls[:size])
    recipe, job = [], []
    for turn in range(args.peer_runs):
        with Sampler(cpu) as sampler:
            seconds = run_recipe(str(manifest), model, f"s3://bench/recipe-{turn}-{int(time.time())}",
                                 seaweed.endpoint.removeprefix("http://"), batch_size=args.batch_size or 32,
                                 actors=args.actors)
        recipe.append({"images_per_s": size / seconds, "seconds": seconds,
                       "core_ms": {k: 1000 * v / size for k, v in sampler.spent().items()}})
        print(f"recipe (Ray Data docs), N={size}, run {turn + 1}: {size / seconds:.1f} images/s ({seconds:.0f} s); "
              "CPU core-ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in recipe[-1]["core_ms"].items()
                                                     if v >= 0.01), flush=True)
        job.append(run_job(job_config(manifest, model, f"s3://bench/peer-{turn}-{int(time.time())}", args), cpu,
                           storage))
        print_job(f"job, N={size}, run {turn + 1}", job[-1], ceilings)
    job_rate = float(np.mean([r["images_per_s"] for r in job]))
    recipe_rate = float(np.mean([r["images_per_s"] for r in recipe]))
    print(f"the job against the recipe at N={size}: {job_rate:.1f} vs {recipe_rate:.1f} images/s = "
          f"{job_rate / recipe_rate:.2f}x (target >= 1.5x: {'met' if job_rate >= 1.5 * recipe_rate else 'NOT met'})",
          flush=True)
    return {"n": size, "recipe": recipe, "job": job, "ratio": job_rate / recipe_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-bulk")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000], help="job runs beside the peer's")
    parser.add_argument("--peer-size", type=int, default=5000, help="N of the recipe-against-job comparison")
    parser.add_argument("--peer-runs", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--costs-size", type=int, default=1024, help="images for the per-stage costs")
    parser.add_argument("--baseline-images", type=int, default=100)
    parser.add_argument("--big", action="store_true", help="also N=20,000 (generates 20,000 images first)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--model", default=None, help="bundle (default: train a small one first)")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--inference-threads", type=int, default=None)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--faults", type=float, nargs="*", default=[0.0, 0.05, 0.25],
                        help="shares of storage requests that fail, one run each (none: skip the faults table)")
    parser.add_argument("--fault-size", type=int, default=1000, help="rows per faults run")
    parser.add_argument("--politeness-size", type=int, default=2000, help="images per politeness run (0: skip)")
    parser.add_argument("--politeness-runs", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    biggest = max([*args.sizes, args.peer_size, args.costs_size, args.politeness_size, 20000 if args.big else 0])
    data = synthetic.generate(out / "data", {"train": 1200, "val": 100, "test": biggest}, progress=False)
    if args.model is None:
        from captioning.train import train  # noqa: PLC0415

        config = DEMO_CONFIG.__class__(**{**DEMO_CONFIG.__dict__, "epochs": 4, "cache_dir": str(out / "cache")})
        train(read_manifest(data["train"]), read_manifest(data["val"]), out / "model", config, progress=False,
              log=lambda _: None)
    model = str(Path(args.model or out / "model").resolve())
    bundle = load_bundle(model)
    server, base = serve(data["test"].parent)
    examples = read_manifest(data["test"]).examples
    urls = [f"{base}/{Path(ex.image).relative_to(data['test'].parent).as_posix()}" for ex in examples]
    results: dict = {"cores": CORES}
    try:
        # Baseline: sequential download, one image at a time, full-recompute generation.
        fetcher = Fetcher(LOOPBACK)
        n = args.baseline_images
        start = time.perf_counter()
        for url in urls[:n]:
            seed_style_caption(bundle, decode_image(fetcher.get(url).data, url, ImageConfig()))
        results["baseline"] = baseline = n / (time.perf_counter() - start)
        print(f"seed-style baseline: {baseline:.2f} images/s on {n} images", flush=True)
        if not args.no_startup:
            results["startup"] = measure_startup(model, urls, out)

        import ray  # noqa: PLC0415

        with SeaweedServer(out / "seaweed") as seaweed:
            seaweed.create_bucket("bench")
            os.environ.update(seaweed.env())  # Ray workers inherit the credentials
            storage = Storage(client=seaweed.client())
            weed = next(p for p in psutil.Process().children(recursive=True) if "weed" in p.name())
            results["ceilings"] = ceilings = measure_ceilings(args, bundle, examples, urls, model, out,
                                                              psutil.Process(server.pid), weed)
            # A fresh local Ray, never the cluster this machine last recorded (which may be long gone).
            ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # the recipe's plan lines; figures only
            cpu = ProcessCPU([server.pid])
            results["peer"] = compare_with_recipe(args, model, urls, out, seaweed, cpu, storage, ceilings)
            results["runs"] = []
            for size in sorted(set(args.sizes + ([20000] if args.big else []))):
                manifest = write_manifest(out, str(size), urls[:size])
                results["runs"].append(run_job(job_config(manifest, model, f"s3://bench/run-{size}-{int(time.time())}",
                                                          args), cpu, storage))
                print_job(f"job, N={size}", results["runs"][-1], ceilings)
            if args.big:
                big = results["runs"][-1]
                near = min(results["runs"] + results["peer"]["job"], key=lambda r: abs(r["n"] - 5000))
                print(f"N=20,000: {big['images_per_s'] / ceilings['cpu_budget']:.0%} of the CPU-budget ceiling "
                      f"(target >= 80%); peak memory {big['peak_pss_mib']:.0f} MiB against {near['peak_pss_mib']:.0f} "
                      f"MiB at N={near['n']}", flush=True)
            if args.politeness_size:
                results["politeness"] = politeness_cost(args, model, urls, out, cpu, storage)
            results["faults"] = fault_table(args, model, urls, out, seaweed, storage) if args.faults else []
            ray.shutdown()
    finally:
        server.terminate()
    print(f"seed-style baseline {results['baseline']:.2f} images/s; the job at N={results['peer']['n']} is "
          f"{np.mean([r['images_per_s'] for r in results['peer']['job']]) / results['baseline']:.0f}x it")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
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
                                storage=StorageConfig(s3_endpoint=proxy.endpoint), politeness=raised_limit(args))
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
