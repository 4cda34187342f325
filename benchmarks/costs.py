"""CPU cost, not only time: core-milliseconds per image of each bulk-job stage measured alone, and of every process
while a job runs, grouped (psutil), so that the benchmark can say how many images/s the cores can pay for."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import psutil


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


TASK_TITLES = ("ray::IDLE", "default_worker.py", "ray::Map(", "ray::ReadCSV", "ray::Write", "ray::FromItems")
OWN_ACTORS = ("ray::_", "StatsActor", "ActorLocationTracker", "DashboardAgent", "AutoscalingCoordinator")


def group_of(process: psutil.Process) -> str | None:
    """Which part of a bulk run a process is, by Ray's process titles and the servers' command lines; None when
    it cannot tell yet (a worker before its title is set, or a process gone)."""
    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return None
    if process.pid == os.getpid():
        return "driver (Ray Data executor, progress, commits)"
    if "CaptionShard" in title or "Predictor" in title:
        return "model actors"
    if "LedgerShard" in title:
        return "host ledger (politeness)"
    if "weed" in title.split(" ", 1)[0]:
        return "SeaweedFS"
    if "http.server" in title:
        return "image server"
    if any(name in title for name in OWN_ACTORS):
        return "Ray's own actors (Ray Data stats, autoscaling, dashboard agent)"
    if any(name in title for name in TASK_TITLES):
        return "fetch and write tasks (Ray workers)"
    return "Ray system (raylet, GCS, monitors)"


class ProcessCPU:
    """CPU seconds by group of this process's whole tree (local Ray lives in it) and of extra processes."""

    def __init__(self, extra: list[int] = ()) -> None:
        self.extra = list(extra)
        self._seen: dict[int, tuple[psutil.Process, str]] = {}

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """pid -> (group, CPU seconds) now. A model actor stays one; a worker takes its latest task's group."""
        root = psutil.Process()
        processes = [root, *root.children(recursive=True)]
        for pid in self.extra:
            try:
                processes.append(psutil.Process(pid))
            except psutil.Error:
                pass
        found = {}
        for process in processes:
            known = self._seen.get(process.pid)
            if known is None or known[0] != process or known[1] != "model actors":
                group = group_of(process) or (known[1] if known else None)
                if group is None:
                    continue
                known = self._seen[process.pid] = (process, group)
            found[process.pid] = (known[1], cpu_seconds(process))
        return found

    @staticmethod
    def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
        """CPU seconds by group between two snapshots (processes born in between count from zero)."""
        groups: dict[str, float] = {}
        for pid, (group, cpu) in after.items():
            groups[group] = groups.get(group, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


class Sampler:
    """Samples CPU by group every second while a run goes on: the last sample of a process that exits keeps its
    CPU (a finished Ray worker's time is otherwise lost), and the peak resident memory (PSS) is kept too."""

    def __init__(self, cpu: ProcessCPU) -> None:
        import threading  # noqa: PLC0415

        self.cpu = cpu
        self.last: dict[int, tuple[str, float]] = {}
        self.peak_pss = 0
        self.pss: list[int] = []  # every sample's total, to tell a plateau from growth
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = self.cpu.snapshot()
        for pid, value in now.items():
            self.last[pid] = value
        total = 0
        for pid in now:
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        self.peak_pss = max(self.peak_pss, total)
        self.pss.append(total)

    def pss_by_quarter(self) -> list[float]:
        """Peak PSS (MiB) in each quarter of the run: flat quarters mean memory does not grow with the rows."""
        n = len(self.pss)
        return [max(self.pss[i * n // 4 : max((i + 1) * n // 4, i * n // 4 + 1)], default=0) / 2**20
                for i in range(4)]

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> "Sampler":
        self._sample()
        self.start = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def spent(self) -> dict[str, float]:
        """CPU seconds by group over the run."""
        return ProcessCPU.spent(self.start, self.last)


def core_ms(work: Callable[[], object], images: int, processes: list[psutil.Process] = ()) -> dict[str, float]:
    """Core-ms per image of running work once: this process's CPU, and that of each extra process."""
    me = psutil.Process()
    before = [cpu_seconds(p) for p in [me, *processes]]
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    after = [cpu_seconds(p) for p in [me, *processes]]
    spent = [1000 * (a - b) / images for a, b in zip(after, before)]
    return {"core_ms": spent[0], "others_core_ms": spent[1:], "wall_ms": 1000 * wall / images}


def stage_costs(config, server: psutil.Process, seaweed: psutil.Process) -> tuple[dict[str, float], dict[str, float]]:
    """Core-ms per image of each stage of the job alone, on the job's own code, config and images: the plan
    written, then every shard fetched, then captioned, then written, one stage at a time in this process; and
    beside them what each output format's writer costs, SeaweedFS included."""
    from captioning.bulk import CaptionShard, CaptionWriter, Captioned  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.images import decode_with_size  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415
    from captioning.shards.fetching import fetch_shard  # noqa: PLC0415
    from captioning.shards.payloads import FetchedShard, ShardInput  # noqa: PLC0415
    from captioning.shards.plan import plan_shards  # noqa: PLC0415
    from captioning.storage import Storage  # noqa: PLC0415

    storage = Storage(config.storage)
    todo, layout = plan_shards(config, storage)
    n = layout.rows
    stage, writer = CaptionShard(config), CaptionWriter(config)
    urls = [example.image for example in read_manifest(config.manifest, config.spec).examples]
    fetcher = Fetcher(config.fetch)
    with ThreadPoolExecutor(config.fetch_threads) as pool:
        data = list(r.data for r in pool.map(fetcher.get, urls))
        decode = core_ms(lambda: list(pool.map(lambda d: decode_with_size(d, "bench", config.image), data)), n)
    fetched: list[FetchedShard] = []
    fetch = core_ms(lambda: fetched.extend(fetch_shard(ShardInput(s), config, writer) for s in todo), n, [server])
    images = np.concatenate([shard.images for shard in fetched])
    stage.bundle.backbone(images[: stage.batch_size])
    features: list[np.ndarray] = []
    backbone = core_ms(lambda: features.extend(stage.bundle.backbone(images[i : i + stage.batch_size]).numpy()
                                               for i in range(0, len(images), stage.batch_size)), n)
    decoder = core_ms(lambda: [stage.generator(batch) for batch in features], n)
    captioned: list[Captioned] = []
    caption = core_ms(lambda: captioned.extend(stage(shard) for shard in fetched), n)
    # What Ray moves between the stages: each payload to its row and back.
    payloads = core_ms(lambda: [type(p).from_row(p.to_row()) for p in [*fetched, *captioned]], n)
    write = core_ms(lambda: [writer.write(shard) for shard in captioned], n, [seaweed])
    return {"fetch (HTTP client)": fetch["core_ms"] - decode["core_ms"], "image server": fetch["others_core_ms"][0],
            "decode": decode["core_ms"], "backbone": backbone["core_ms"],
            "decoder": decoder["core_ms"],
            "caption stage's own (batching, attention maps)": max(0.0, caption["core_ms"] - backbone["core_ms"]
                                                                   - decoder["core_ms"]),
            "payloads to and from Ray": payloads["core_ms"],
            "write (Parquet, attention, marker)": write["core_ms"], "SeaweedFS": write["others_core_ms"][0]}, {
            "Parquet": write["core_ms"] + write["others_core_ms"][0],
            "WebDataset (the model's view as JPEG)": webdataset_cost(config, captioned, fetched, None, seaweed, n),
            "WebDataset --keep-original": webdataset_cost(config, captioned, fetched, dict(enumerate(data)), seaweed,
                                                          n)}


def webdataset_cost(config, captioned: list, fetched: list, originals: dict[int, bytes] | None,
                    seaweed: psutil.Process, n: int) -> float:
    """Core-ms per image of writing the captioned shards as WebDataset tars, SeaweedFS included: with the image
    bytes as fetched (originals), or the model's view encoded as JPEG (in the job the fetch threads do that)."""
    from dataclasses import replace  # noqa: PLC0415

    from captioning.images import encode_jpeg  # noqa: PLC0415
    from captioning.webdataset import WebDatasetWriter  # noqa: PLC0415

    suffix = "-wds-original" if originals is not None else "-wds"
    writer = WebDatasetWriter(replace(config, output=config.output + suffix, output_format="webdataset",
                                      keep_original=originals is not None))

    def write() -> None:
        for shard, loaded in zip(captioned, fetched):
            for row, image in zip([r for r in shard.rows if r.ok], loaded.images):
                row.image_bytes = originals[row.index] if originals is not None else encode_jpeg(image)
            writer.write(shard)

    cost = core_ms(write, n, [seaweed])
    return cost["core_ms"] + cost["others_core_ms"][0]
