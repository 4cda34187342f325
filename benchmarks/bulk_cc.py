"""The Conceptual-Captions-shaped case at scale: 100,000 rows of caption<TAB>url, 90% of them dead (HTTP 404),
10% 224x224 JPEGs, one loopback server; the job on its default settings, into SeaweedFS.

Prints rows/s end to end, the caption actors' busy share (what they wait on when it is low), the stage costs, and
CPU by process group; --py-spy SECONDS also profiles every fetch worker with py-spy (no code changes) and prints
where their time goes.

    python benchmarks/bulk_cc.py                 # 100,000 rows
    python benchmarks/bulk_cc.py --rows 20000 --py-spy 20
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from captioning import console  # noqa: E402

console.setup("warning")

import psutil  # noqa: E402

from captioning.bulk import BulkConfig, read_output  # noqa: E402
from captioning.bundle import MANIFEST  # noqa: E402
from captioning.config import FetchConfig, PolitenessConfig  # noqa: E402
from captioning.shards import defaults  # noqa: E402
from captioning.datasets import synthetic  # noqa: E402
from captioning.manifest import ManifestSpec  # noqa: E402
from captioning.storage import Storage  # noqa: E402
from ops.seaweed import SeaweedServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from costs import ProcessCPU, Sampler  # noqa: E402

# /img/K.jpg: a 404 unless K % 10 == 0; then one of the source JPEGs with K in a comment segment, so that every
# live URL serves different bytes (as the web does) and the same pixels.
CC_SERVER = """
import http.server, pathlib, struct, sys
sources = [p.read_bytes() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpg"))]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK = 40 ms each
    def log_message(self, *args): pass
    def do_GET(self):
        try:
            key = int(self.path.rsplit("/", 1)[-1].split(".")[0])
        except ValueError:
            key = 1
        if key % 10:
            body, status, kind = b"not found", 404, "text/plain"
        else:
            data = sources[key // 10 % len(sources)]
            comment = str(key).encode()
            body, status, kind = data[:2] + b"\\xff\\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:], 200, "image/jpeg"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def profile(pids: list[int], seconds: float, out: Path) -> collections.Counter:
    """py-spy record of each pid for seconds (raw folded stacks); samples by innermost project or library frame."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    frames: collections.Counter = collections.Counter()
    jobs = []
    for pid in pids:
        path = out / f"py-spy-{pid}.txt"
        jobs.append((path, subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                             "--format", "raw", "--output", str(path), "--nonblocking"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for path, process in jobs:
        process.wait()
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            names = stack.split(";")
            ours = [n for n in names if "captioning/" in n or "urllib3" in n or "http/client" in n or "socket" in n]
            frames[(ours or names)[-1][:110]] += int(count)
    return frames


def task_workers() -> list[int]:
    """Ray's pooled task workers (fetch and write tasks run in them; idle ones take the next task), not the
    actors: Ray titles them `ray::IDLE` or `ray::Map(fetch_shard_task)` and so on."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and ("IDLE" in title or "_task" in title):
            pids.append(process.pid)
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-cc")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--model", default=None, help="bundle (default: the one benchmarks/bulk.py trained)")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                        help="profile the fetch workers this long, once the actors are busy")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    model = str(Path(args.model or "runs/bench-bulk/model").resolve())
    if not Path(model, MANIFEST).exists():
        print(f"error: {model}: no model bundle; run benchmarks/bulk.py first or pass --model", file=sys.stderr)
        return 2
    images = out / "sources"
    if not images.exists():
        data = synthetic.generate(out / "data", {"test": 500}, progress=False)
        images.mkdir(parents=True)
        for path in (data["test"].parent / "images" / "test").glob("*.jpg"):
            shutil.copy(path, images / path.name)
    server = subprocess.Popen([sys.executable, "-c", CC_SERVER, str(images)], stdout=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{server.stdout.readline().strip()}"
    manifest = out / f"cc-{args.rows}.tsv"
    manifest.write_text("".join(f"a picture number {i}\t{base}/img/{i}.jpg\n" for i in range(args.rows)))
    import ray  # noqa: PLC0415

    from jobs.batch import run  # noqa: PLC0415

    try:
        with SeaweedServer(out / "seaweed") as seaweed:
            seaweed.create_bucket("bench")
            os.environ.update(seaweed.env())
            ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            config = BulkConfig(str(manifest), model, f"s3://bench/cc-{args.rows}-{int(time.time())}",
                                ManifestSpec(format="cc-tsv"), fetch=FetchConfig(allowed_networks=("127.0.0.1/32",)),
                                # One loopback host serves every row: its limit at the job's own concurrency.
                                politeness=PolitenessConfig(
                                    per_host_concurrency=defaults.FETCH_THREADS * defaults.FETCH_TASKS_PER_ACTOR))
            frames: collections.Counter = collections.Counter()
            if args.py_spy:
                def spy() -> None:
                    time.sleep(45)  # past start-up: the actors are captioning
                    frames.update(profile(task_workers(), args.py_spy, out))
                threading.Thread(target=spy, daemon=True).start()
            with Sampler(ProcessCPU([server.pid])) as sampler:
                start = time.perf_counter()
                summary = run(config, log=lambda _: None, progress=False)
                seconds = time.perf_counter() - start
            rows = list(read_output(config.output, Storage(client=seaweed.client())))
            ray.shutdown()
    finally:
        server.terminate()
    statuses = collections.Counter(r["status"] for r in rows)
    stages = summary["stages"]
    print(f"CC-shaped, {args.rows} rows: {args.rows / seconds:.0f} rows/s end to end ({seconds:.0f} s); "
          f"statuses {dict(statuses)}; exactly once: {'yes' if len({r['row'] for r in rows}) == args.rows else 'NO'}")
    print(f"  start-up {stages['startup_seconds']:.1f} s (first captions at {stages['first_row_seconds']:.1f} s); "
          f"caption actors busy {stages['caption_busy']:.0%} (target >= 95%): {stages['why']}")
    print("  wall ms per captioned image: " + ", ".join(f"{k} {v:.1f}" for k, v in stages["ms_per_image"].items()))
    print("  CPU core-ms per row by process: " + ", ".join(f"{k} {1000 * v / args.rows:.2f}"
                                                        for k, v in sampler.spent().items()))
    if frames:
        total = sum(frames.values())
        print(f"  py-spy, fetch workers, {total} samples; where they are:")
        for frame, count in frames.most_common(10):
            print(f"    {count / total:5.1%} {frame}")
    (out / "results.json").write_text(json.dumps({"rows": args.rows, "seconds": seconds, "statuses": statuses,
                                                  "stages": stages, "cpu": sampler.spent(),
                                                  "py_spy": frames.most_common(30)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
