"""The WebDataset writer of the bulk job: shards/shard-N.tar, a sample per row, then the same commit marker.

Per row, under a key that is its manifest row number (12 digits, so tar order is row order):
  KEY.json             the whole output row (OUTPUT_SCHEMA), for every row, failed ones too
  KEY.jpg (or .png...) the image: the model's view as JPEG, or with --keep-original the bytes as fetched
  KEY.txt              the caption
  KEY.attention.npy    float16 (words, 7, 7) attention maps
Only ok rows have the last three. The webdataset package and ray.data.read_webdataset read the tars as they are.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa

from captioning.bulk import OUTPUT_SCHEMA, SCHEMA_FIELDS, CaptionWriter, Captioned
from captioning.bulk_config import BulkConfig
from captioning.images import image_extension
from captioning.output_source import FOLDER, tar_members
from captioning.shards.layout import shard_name, uri
from captioning.storage import Storage

def tar_uri(output: str, shard: int) -> str:
    """Where a shard's tar lives."""
    return uri(output, FOLDER, f"{shard_name(shard)}.tar")


def sample_key(row: int) -> str:
    """A row's sample key: no dots (WebDataset splits a member's name at its first dot), sorted as rows are."""
    return f"{row:012d}"


class WebDatasetWriter(CaptionWriter):
    """Bulk captions as WebDataset tar shards; exactly once by the same commit markers as Parquet."""

    def __init__(self, config: BulkConfig) -> None:
        super().__init__(config)
        self.images = "original" if config.keep_original else "model"

    def committed_rows(self, shard: int, storage: Storage) -> pa.Table:
        """A shard's rows from its tar's JSON members."""
        members = tar_members(storage.read_bytes(tar_uri(self.config.output, shard)))
        rows = [json.loads(body) for name, body in sorted(members.items()) if name.endswith(".json")]
        return pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA_FIELDS} for r in rows], schema=OUTPUT_SCHEMA)

    def write_data(self, storage: Storage, processed: Captioned, rows: list[dict], fresh: set[int],
                   attention_file: str) -> None:
        """One tar: this attempt's rows from the payload, kept rows' files copied from the shard's last tar."""
        where = tar_uri(self.config.output, processed.shard)
        old = tar_members(storage.read_bytes(where)) if len(fresh) < len(rows) else {}
        images = {row.row: row.image_bytes for row in processed.rows if row.image_bytes is not None}
        files: list[tuple[str, bytes]] = []
        for row in rows:
            key = sample_key(row["row"])
            if row["row"] not in fresh:  # kept from an earlier attempt: its files as that attempt wrote them
                files += [(name, body) for name, body in sorted(old.items()) if name.split(".", 1)[0] == key]
                continue
            row = {k: row.get(k) for k in SCHEMA_FIELDS}
            if row["status"] == "ok":
                image = images.get(row["row"])
                if image is not None:
                    member = f"{key}.{image_extension(image)}"
                    files.append((member, image))
                    row["image_file"] = f"{FOLDER}/{shard_name(processed.shard)}.tar#{member}"
                files.append((f"{key}.txt", (row["caption"] or "").encode()))
                if row["attention_file"]:
                    start, length = row["attention_offset"], row["attention_length"]
                    files.append((f"{key}.attention.npy", _npy(processed.attention[start : start + length])))
                    row.update(attention_file=f"{key}.attention.npy", attention_offset=0)
            files.append((f"{key}.json", json.dumps(row, default=_plain).encode()))
        storage.write_bytes(where, _tar(files), "application/x-tar")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    """A tar of the files in order, with fixed metadata: the same rows give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), 0, 0o644
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()
