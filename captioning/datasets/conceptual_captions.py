"""Conceptual Captions: the caption<TAB>url TSV, images fetched in parallel, resumable, failures recorded."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable


from captioning import console
from captioning.atomic import atomic_path, atomic_write
from captioning.config import FetchConfig, ImageConfig, PolitenessConfig
from captioning.errors import CaptioningError, internal_error
from captioning.fetch import Fetcher
from captioning.hosts.gate import LocalLink, Politeness, in_turns, through_pauses
from captioning.images import open_image
from captioning.manifest import Example, Manifest, ManifestSpec, read_manifest

DEFAULT_BASE_URL = "https://storage.googleapis.com/gcc-data"
SPLITS = {"train": "Train/GCC-training.tsv", "validation": "Validation/GCC-1.1.0-Validation.tsv"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}
MAX_TSV_BYTES = 2 * 1024**3


def image_name(url: str) -> str:
    """File stem for a URL: the same URL always lands in the same file (what makes reruns resumable)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:20]


def download(
    out: str | Path, split: str = "validation", limit: int | None = None, base_url: str = DEFAULT_BASE_URL,
    fetch: FetchConfig | None = None, image: ImageConfig | None = None, workers: int = 32,
    log: Callable[[str], None] = print, politeness: PolitenessConfig | None = None,
) -> tuple[Path, Path]:
    """Write <split>.jsonl (one row per image fetched) and <split>-failures.jsonl (url, reason per failure).

    politeness: what the image hosts are owed, as in a bulk job (default: its defaults; robots.txt, per-host
    limits, Retry-After, the breaker and systemic pauses)."""
    if split not in SPLITS:
        raise CaptioningError(split, f"unknown split; choose one of {', '.join(SPLITS)}")
    out = Path(out)
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    fetch = fetch or FetchConfig()
    rules = politeness or PolitenessConfig()
    image = image or ImageConfig()
    tsv = out / f"{split}.tsv" if limit is None else out / f"{split}-first{limit}.tsv"
    if not tsv.exists():
        url = f"{base_url.rstrip('/')}/{SPLITS[split]}"
        log(f"downloading {url}" + (f" (first {limit} rows)" if limit else ""))
        Fetcher(fetch).download(url, tsv, MAX_TSV_BYTES, max_lines=limit)  # the data set's own file: no gate
    manifest = read_manifest(tsv, ManifestSpec(format="cc-tsv"))
    rows = manifest.examples[:limit] if limit else manifest.examples

    gate = Politeness(rules, LocalLink(rules), fetch.user_agent) if rules.active else None
    fetcher = Fetcher(fetch, gate)

    def get(url: str) -> bytes:
        if gate is not None:
            gate.allowed(url, fetcher)
        return fetcher.get(url).data

    def fetch_one(row) -> dict:  # noqa: ANN001
        stem = image_name(row.image)
        for ext in EXTENSIONS.values():
            if (folder / f"{stem}{ext}").exists():
                return {"image": f"images/{split}/{stem}{ext}", "status": "ok", "cached": True}
        try:
            data = through_pauses(gate, lambda: get(row.image))
            decoded = open_image(data, row.image, image)
        except CaptioningError as err:
            return {"status": err.reason, "error": err.message}
        except Exception as err:  # noqa: BLE001  (one row's surprise must never stop the download)
            return {"status": "internal_error", "error": internal_error(err, row.image)}
        ext = EXTENSIONS.get(decoded.format or "", ".img")
        atomic_write(folder / f"{stem}{ext}", data)
        return {"image": f"images/{split}/{stem}{ext}", "status": "ok", "cached": False}

    manifest_path, failures_path = out / f"{split}.jsonl", out / f"{split}-failures.jsonl"
    counts = {"ok": 0, "failed": 0, "cached": 0}
    try:
        _write(manifest, rows, fetch_one, manifest_path, failures_path, counts, split, workers)
    finally:
        figures = gate.close() if gate is not None else {}
    hosts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(figures.items()) if v)
    log(f"{split}: {counts['ok']} images ({counts['cached']} already there), {counts['failed']} failures "
        f"listed in {failures_path}" + (f"; hosts: {hosts}" if hosts else ""))
    return manifest_path, failures_path


def _write(manifest: Manifest, rows: list[Example], fetch_one: Callable[[Example], dict],
           manifest_path: Path, failures_path: Path, counts: dict[str, int], split: str, workers: int) -> None:
    """Fetch rows chunk by chunk (each in turns over its hosts) and write both files in the TSV's order."""
    with atomic_path(manifest_path) as good_tmp, atomic_path(failures_path) as bad_tmp, \
            open(good_tmp, "w") as good, open(bad_tmp, "w") as bad, ThreadPoolExecutor(workers) as pool:
        for err in manifest.errors:
            bad.write(json.dumps({"row": err.source, "status": err.reason, "error": err.message}) + "\n")
            counts["failed"] += 1
        bar = console.progress(len(rows), f"conceptual captions {split}", "images")
        chunk = workers * 16  # bounded in-flight work: the TSV may hold millions of rows
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            turns = in_turns(batch, lambda row: row.image)
            results = {}
            for row, result in zip(turns, pool.map(fetch_one, turns)):
                results[id(row)] = result
                bar.update(1)
            for row, result in ((row, results[id(row)]) for row in batch):
                caption = row.captions[0] if row.captions else ""
                if result["status"] == "ok":
                    good.write(json.dumps({"image": result["image"], "caption": caption, "url": row.image}) + "\n")
                    counts["ok"] += 1
                    counts["cached"] += result["cached"]
                else:
                    bad.write(json.dumps({"row": row.row, "url": row.image, "caption": caption,
                                          "status": result["status"], "error": result["error"]}) + "\n")
                    counts["failed"] += 1
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"])
        bar.close()
