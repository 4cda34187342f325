"""A bulk captioning output as an image source: its WebDataset tars feed `features`, `train` and `retrain`
like a manifest, so nothing is fetched from the web again (and links that rotted since are not lost)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterator

from captioning.errors import CaptioningError
from captioning.shards.layout import COMMITTED, PLAN, SUCCESS, uri
from captioning.storage import Storage

if TYPE_CHECKING:
    from captioning.manifest import ManifestSpec, Row

FOLDER = "shards"  # a WebDataset output's tars: shards/shard-N.tar
MEMBER = "#"  # shards/shard-N.tar#KEY.jpg: a member of a tar, as image sources name it
TARS_HELD = 4  # tars kept in memory per process: a shard's rows sit in one or two consecutive tars
# What a duplicate row shares with the row it names (read_output(shared=True), and rows read as a manifest).
SHARED_FIELDS = ("caption", "score", "status", "error", "width", "height", "sha256", "model_version", "model",
                 "attention_file", "attention_offset", "attention_length", "attention_png", "image_file")


def tar_members(data: bytes) -> dict[str, bytes]:
    """Every regular file of a tar, by name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def share_results(rows: list[dict]) -> Iterator[dict]:
    """Each row, a duplicate with the result of the row it shares (following a chain to the row captioned),
    keeping its own row, id, url and duplicate_of."""
    by_row = {row["row"]: row for row in rows}
    for row in rows:
        source, hops = row, 0
        while source["status"] == "duplicate" and source.get("duplicate_of") in by_row and hops < len(rows):
            source, hops = by_row[source["duplicate_of"]], hops + 1
        yield row if source is row else {**row, **{k: source[k] for k in SHARED_FIELDS if k in source}}


def bulk_output_format(location: str, storage: Storage) -> str | None:
    """ "webdataset" or "parquet" if location is a bulk captioning output, else None (a manifest file)."""
    try:
        data = storage.read_tagged(uri(location, PLAN))
    except CaptioningError:
        return None
    if data is None:
        return None
    try:
        plan = json.loads(data[0])
    except ValueError:
        return None
    if not isinstance(plan, dict) or plan.get("kind") or "url_column" not in plan:
        return None  # a feature set's plan, or not a plan at all
    return plan.get("output_format") or "parquet"


def check_source(location: str, storage: Storage) -> None:
    """Before any work: a bulk output given as a manifest must keep its images and be finished."""
    kind = bulk_output_format(location, storage)
    if kind is not None:
        _usable(location, kind)
        describe_source(location, storage, kind)


def _usable(location: str, kind: str | None) -> None:
    if kind != "webdataset":
        raise CaptioningError(location, "is a bulk output in Parquet, which keeps no images: caption with "
                              "--output-format webdataset to compute features or train from an output")


def output_rows(location: str, spec: "ManifestSpec", storage: Storage) -> Iterator["Row"]:
    """The rows of a WebDataset bulk output whose image it kept, each naming its tar member: captions from the
    manifest's reference caption, or with spec.use_generated the caption the job wrote."""
    from captioning.manifest import Row  # noqa: PLC0415

    _usable(location, bulk_output_format(location, storage))
    column = "caption" if spec.use_generated else "reference"
    rows = []
    for marker in sorted(storage.list(uri(location, COMMITTED))):
        if not marker.endswith(".json"):
            continue
        name = marker.rsplit("/", 1)[-1].removesuffix(".json")
        members = tar_members(storage.read_bytes(uri(location, FOLDER, f"{name}.tar")))
        rows += [json.loads(body) for member, body in sorted(members.items()) if member.endswith(".json")]
    for row in share_results(rows):
        if row["status"] != "ok" or not row.get("image_file"):
            continue  # failed rows kept no image
        caption = row.get(column)
        source = uri(location, row["image_file"])
        yield Row(row["row"], row["id"], source, (caption,) if caption else (), value=source)


def is_member(source: str) -> bool:
    """Whether an image source names a member of a tar (shards/shard-N.tar#KEY.jpg)."""
    return MEMBER in source and source.split(MEMBER, 1)[0].endswith(".tar")


class _Tars:
    """The last few tars read, whole, by URI: rows of a shard come in row order, so reads stay in them."""

    def __init__(self) -> None:
        self._held: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def member(self, source: str, storage: Storage, max_bytes: int | None) -> bytes:
        """One member's bytes; the size cap applies to the member."""
        where, name = source.split(MEMBER, 1)
        with self._lock:  # one read per tar, however many fetch threads want it
            members = self._held.get(where)
            if members is None:
                members = tar_members(storage.read_bytes(where))
                self._held[where] = members
                while len(self._held) > TARS_HELD:
                    self._held.popitem(last=False)
            self._held.move_to_end(where)
        if name not in members:
            raise CaptioningError(source, "no such member in the tar", "not_found")
        data = members[name]
        if max_bytes is not None and len(data) > max_bytes:
            raise CaptioningError(source, f"{len(data)} bytes, over the {max_bytes}-byte cap", "too_large")
        return data


TARS = _Tars()


def describe_source(source: str, storage: Storage, output: str | None) -> dict[str, int | str]:
    """A manifest's fingerprint, to tell whether features made from it still hold: a file's size and hash, a
    bulk output's _SUCCESS.json (rewritten by every run that changed it); an unfinished output is refused."""
    if output is None:
        return storage.describe(source)
    if not storage.exists(uri(source, SUCCESS)):
        raise CaptioningError(source, "is an unfinished bulk output (no _SUCCESS.json): rerun its batch command "
                              "to finish it first")
    return storage.describe(uri(source, SUCCESS))
