"""Flickr8k: the two public zips, the official train/dev/test lists, five captions per image."""

from __future__ import annotations

import collections
import json
import zipfile
from pathlib import Path
from typing import Callable


from captioning import console
from captioning.atomic import atomic_path, atomic_write
from captioning.config import FetchConfig
from captioning.errors import CaptioningError
from captioning.fetch import Fetcher

DEFAULT_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
IMAGES_ZIP, TEXT_ZIP = "Flickr8k_Dataset.zip", "Flickr8k_text.zip"
CAPTIONS_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
MAX_ZIP_BYTES = 4 * 1024**3


def download(
    out: str | Path, base_url: str = DEFAULT_BASE_URL, fetch: FetchConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Fetch (or reuse) the zips, extract the images, write train/val/test JSONL manifests."""
    out = Path(out)
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(fetch or FetchConfig(read_timeout=60.0))
    zips = {}
    for name in (TEXT_ZIP, IMAGES_ZIP):
        target = downloads / name
        if target.exists():
            log(f"reusing {target}")
        else:
            log(f"downloading {base_url.rstrip('/')}/{name}")
            fetcher.download(f"{base_url.rstrip('/')}/{name}", target, MAX_ZIP_BYTES)
        zips[name] = target
    captions, splits = _read_text(zips[TEXT_ZIP])
    images = _extract_images(zips[IMAGES_ZIP], out / "images")
    manifests = {}
    for split, names in splits.items():
        path = out / f"{split}.jsonl"
        missing = [n for n in names if n not in images or n not in captions]
        with atomic_path(path) as tmp, open(tmp, "w") as handle:
            for name in names:
                if name in images and name in captions:
                    handle.write(json.dumps({"image": f"images/{name}", "caption": captions[name]}) + "\n")
        if missing:
            log(f"{split}: {len(missing)} listed images have no image file or captions, e.g. {missing[0]}")
        manifests[split] = path
        log(f"wrote {path} ({len(names) - len(missing)} images)")
    return manifests


def _read_text(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(m).name: m for m in archive.namelist()}
            for needed in (CAPTIONS_FILE, *SPLIT_FILES.values()):
                if needed not in members:
                    raise CaptioningError(str(path), f"{needed} is not in the archive")
            captions: dict[str, list[str]] = collections.defaultdict(list)
            for number, line in enumerate(archive.read(members[CAPTIONS_FILE]).decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                key, sep, caption = line.partition("\t")
                if not sep or "#" not in key:
                    raise CaptioningError(f"{path}:{CAPTIONS_FILE}:{number}", "expected IMAGE#N<TAB>caption")
                captions[key.split("#")[0]].append(caption.strip())
            splits = {split: [n.strip() for n in archive.read(members[f]).decode("utf-8").splitlines() if n.strip()]
                      for split, f in SPLIT_FILES.items()}
    except zipfile.BadZipFile:
        raise CaptioningError(str(path), "not a valid zip file (delete it to download again)") from None
    return dict(captions), splits


def _extract_images(path: Path, folder: Path) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.lower().endswith(".jpg") and not m.is_dir()]
            names = set()
            for member in console.progress(desc="extracting images", unit="images", iterable=members):
                name = Path(member.filename).name  # flattened: no path from the archive reaches the disk
                if name.startswith("._"):
                    continue  # macOS resource forks shipped inside the zip
                target = folder / name
                if not target.exists() or target.stat().st_size != member.file_size:
                    atomic_write(target, archive.read(member))
                names.add(name)
    except zipfile.BadZipFile:
        raise CaptioningError(str(path), "not a valid zip file (delete it to download again)") from None
    return names
