"""Manifests (CSV, TSV, Conceptual Captions TSV, JSONL, Parquet) to examples: one image, many captions."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from captioning.errors import ManifestError
from captioning.storage import Storage, StorageError, is_s3, local_path

FORMATS = ("csv", "tsv", "cc-tsv", "jsonl", "parquet")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestSpec:
    """Which columns hold what; format "auto" goes by file extension."""

    format: str = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None
    use_generated: bool = False  # a bulk output as the source: its generated captions, not the references


@dataclass(frozen=True)
class Example:
    """One image and all its reference captions; row is the first manifest row it came from."""

    id: str
    image: str
    captions: tuple[str, ...]
    row: int


@dataclass
class Manifest:
    """The examples a manifest yielded plus one error per malformed row (nothing is dropped silently)."""

    source: str
    examples: list[Example] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)

    def pairs(self) -> list[tuple[Example, str]]:
        """One (example, caption) pair per caption: training sees each image once per caption."""
        return [(ex, caption) for ex in self.examples for caption in ex.captions]


def detect_format(path: str) -> str:
    """Format from the file name (a trailing .gz is ignored)."""
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise ManifestError(path, "cannot tell the manifest format from the name; pass --format")


def stable_id(image: str) -> str:
    """Id for rows without an id column: a hash of the image path or URL."""
    return hashlib.sha1(image.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One manifest row as it stands (no grouping): what bulk jobs emit exactly one output row for.

    value is the image cell exactly as written; image is where it resolves to (relative paths are
    relative to the manifest).
    """

    row: int
    id: str
    image: str
    captions: tuple[str, ...]
    error: ManifestError | None = None
    value: str = ""


def resolve_image(value: str, base: str) -> str:
    """A manifest's image cell as something to read: URLs and s3:// as written, file:// and paths as paths."""
    if value.startswith("file://"):
        return str(local_path(value))
    if SCHEME.match(value) or Path(value).is_absolute():
        return value
    return base + value


def iter_rows(path: str | Path, spec: ManifestSpec | None = None, storage: Storage | None = None) -> Iterator[Row]:
    """Stream the rows of a manifest (local, file:// or s3://); a malformed row comes with its error set."""
    spec = spec or ManifestSpec()
    source = str(path)
    from captioning.output_source import bulk_output_format, output_rows  # noqa: PLC0415

    if spec.format == "auto" and bulk_output_format(source, storage or Storage()):
        yield from output_rows(source, spec, storage or Storage())
        return
    local = str(local_path(source))
    if is_s3(source):
        try:
            local = str((storage or Storage()).local_file(source))
        except StorageError as err:
            raise ManifestError(source, f"cannot fetch manifest: {err.message}") from None
    fmt = detect_format(source) if spec.format == "auto" else spec.format
    if fmt not in FORMATS:
        raise ManifestError(source, f"unknown manifest format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "tsv" and _looks_like_cc_tsv(local, spec):
        if spec.format != "auto":
            raise ManifestError(source, f"has no {spec.image_column!r} column and its first row looks like "
                                "Conceptual Captions' headerless caption<TAB>url; pass --format cc-tsv")
        log.warning("%s: no %r column and the first row looks like caption<TAB>url: reading it as "
                    "Conceptual Captions TSV (--format cc-tsv)", source, spec.image_column)
        fmt = "cc-tsv"
    if fmt == "cc-tsv":
        spec = ManifestSpec(fmt, image_column="url", caption_column="caption", id_column=spec.id_column)
    # Relative image paths are relative to the manifest, wherever it lives.
    base = source.rsplit("/", 1)[0] + "/" if is_s3(source) else str(Path(local).resolve().parent) + "/"
    for row_number, row in _rows(local, fmt, source):
        try:
            if "_error" in row:
                raise ValueError(row["_error"])
            image, captions, row_id = _parse(row, spec)
        except ValueError as err:
            error = ManifestError(f"{source}:{row_number}", str(err), "bad_row")
            value = row.get(spec.image_column) if isinstance(row.get(spec.image_column), str) else ""
            yield Row(row_number, f"row-{row_number}", "", (), error, value)
            continue
        resolved = resolve_image(image.strip(), base)
        yield Row(row_number, row_id or stable_id(resolved), resolved, captions, value=image)


def read_manifest(path: str | Path, spec: ManifestSpec | None = None, storage: Storage | None = None) -> Manifest:
    """Read a whole manifest, grouping rows by image; malformed rows become Manifest.errors."""
    manifest = Manifest(str(path))
    by_image: dict[str, int] = {}
    for row in iter_rows(path, spec, storage):
        if row.error:
            manifest.errors.append(row.error)
        elif row.image in by_image:
            old = manifest.examples[by_image[row.image]]
            manifest.examples[by_image[row.image]] = Example(old.id, old.image, old.captions + row.captions, old.row)
        else:
            by_image[row.image] = len(manifest.examples)
            manifest.examples.append(Example(row.id, row.image, row.captions, row.row))
    return manifest


def _parse(row: dict[str, Any], spec: ManifestSpec) -> tuple[str, tuple[str, ...], str | None]:
    image = row.get(spec.image_column)
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"missing or empty {spec.image_column!r} column (columns: {', '.join(map(str, row))})")
    if "\x00" in image:
        raise ValueError(f"{spec.image_column!r} holds a NUL character")
    raw = row.get(spec.caption_column)
    if raw is None:
        captions: tuple[str, ...] = ()
    elif isinstance(raw, str):
        captions = (raw,) if raw.strip() else ()
    elif isinstance(raw, (list, tuple)) and all(isinstance(c, str) for c in raw):
        captions = tuple(c for c in raw if c.strip())
    else:
        raise ValueError(f"{spec.caption_column!r} must be text or a list of texts, got {type(raw).__name__}")
    row_id = None
    if spec.id_column:
        value = row.get(spec.id_column)
        if value is None or str(value).strip() == "":
            raise ValueError(f"missing {spec.id_column!r} column")
        row_id = str(value)
    return image, captions, row_id


def _looks_like_cc_tsv(path: str, spec: ManifestSpec) -> bool:
    """A headerless caption<TAB>url file read as a TSV: its "header" is a caption and a URL."""
    try:
        with _open_text(path) as handle:
            first = handle.readline().rstrip("\r\n").split("\t")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):
        return False  # the reader proper reports it
    from captioning.fetch import is_url  # noqa: PLC0415  (urllib3: only when a headerless TSV is sniffed)

    return spec.image_column not in first and len(first) == 2 and is_url(first[1].strip())


def _open_text(path: str) -> IO[str]:
    raw: IO[bytes] = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _rows(path: str, fmt: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) pairs of the local file path; errors name the source the user gave."""
    if not Path(path).exists():
        raise ManifestError(source, "manifest not found")
    try:
        if fmt == "parquet":
            yield from _parquet_rows(path, source)
            return
        with _open_text(path) as handle:
            if fmt == "jsonl":
                yield from _jsonl_rows(handle)
            elif fmt == "cc-tsv":
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    fields = line.rstrip("\r\n").split("\t")
                    if len(fields) != 2:
                        yield number, {"_error": f"expected caption<TAB>url, got {len(fields)} fields"}
                        continue
                    yield number, {"caption": fields[0], "url": fields[1]}
            else:
                reader = csv.DictReader(handle, delimiter="\t" if fmt == "tsv" else ",")
                for row in reader:
                    if None in row:  # more fields than the header names
                        row = {"_error": f"{len(row) - 1 + len(row[None])} fields, header has {len(row) - 1}"}
                    yield reader.line_num, row
    except UnicodeDecodeError as err:
        raise ManifestError(source, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError, csv.Error, zlib.error) as err:
        raise ManifestError(source, f"cannot read manifest: {err}") from None


def _jsonl_rows(handle: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, {"_error": f"invalid JSON ({err.msg})"}
            continue
        except RecursionError:
            yield number, {"_error": "JSON nested too deeply"}
            continue
        yield number, row if isinstance(row, dict) else {"_error": "row is not a JSON object"}


def _parquet_rows(path: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq  # noqa: PLC0415  (heavy import, only for Parquet)

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise ManifestError(source, f"not a readable Parquet file: {err}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            yield number, row
