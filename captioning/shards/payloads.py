"""Typed payloads between the engine's stages, each owning its conversion to and from a Ray Data row.

A Ray row holds only Arrow-native values: numbers, strings, bytes. A payload's record lists travel as one
Arrow IPC stream whose schema comes from the record's type hints, its arrays as .npy bytes (no pickle), so a
renamed or retyped field fails where the payload is built, on either side, not deep inside a remote stage.
"""

from __future__ import annotations

import io
import types
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import pyarrow as pa

from captioning.shards.timings import StageRecord

P = TypeVar("P", bound="Payload")
_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_(), bytes: pa.binary()}


def _optional(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def _arrow_type(hint: Any) -> pa.DataType:
    hint = _optional(hint)
    origin = get_origin(hint)
    if origin is list:
        return pa.list_(_arrow_type(get_args(hint)[0]))
    if origin is dict:
        key, value = get_args(hint)
        return pa.map_(_arrow_type(key), _arrow_type(value))
    if hint in _ARROW:
        return _ARROW[hint]
    raise TypeError(f"no Arrow type for {hint!r}")


@cache
def record_schema(record: type) -> pa.Schema:
    """The Arrow schema of a record dataclass, from its type hints."""
    hints = get_type_hints(record)
    return pa.schema([(f.name, _arrow_type(hints[f.name])) for f in fields(record)])


def records_to_bytes(records: list[Any], record: type) -> bytes:
    """A list of record dataclasses as one Arrow IPC stream."""
    schema = record_schema(record)
    table = pa.Table.from_pylist([{f: getattr(r, f) for f in schema.names} for r in records], schema=schema)
    return table_to_bytes(table)


def records_from_bytes(data: bytes, record: type) -> list[Any]:
    """The records written by records_to_bytes."""
    table = table_from_bytes(data)
    if table.schema != record_schema(record):
        raise TypeError(f"payload rows are not {record.__name__} records: {table.schema}")
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    rows = table.to_pylist()
    for row in rows:
        for name in maps:  # Arrow gives maps as (key, value) pairs
            row[name] = dict(row[name]) if row[name] is not None else None
    return [record(**row) for row in rows]


def table_to_bytes(table: pa.Table) -> bytes:
    """An Arrow table as IPC stream bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    """The table written by table_to_bytes."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def array_to_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes (dtype and shape inside, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    """The array written by array_to_bytes."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class Payload:
    """A stage's input or output: a dataclass whose fields are scalars, record lists, tables or arrays."""

    def to_row(self) -> dict[str, Any]:
        """This payload as a Ray Data row of Arrow-native values."""
        hints = _hints(type(self))
        return {f.name: _encode(getattr(self, f.name), hints[f.name]) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_row(cls: type[P], row: dict[str, Any]) -> P:
        """The payload a Ray Data row holds (what to_row gave, after Ray's transport)."""
        hints = _hints(cls)
        return cls(**{f.name: _decode(row[f.name], hints[f.name]) for f in fields(cls)})  # type: ignore[arg-type]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _record_of(hint: Any) -> type | None:
    hint = _optional(hint)
    if get_origin(hint) is list and is_dataclass(get_args(hint)[0]):
        return get_args(hint)[0]
    return None


def _encode(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if (record := _record_of(hint)) is not None:
        return records_to_bytes(value, record)
    if _optional(hint) is pa.Table:
        return table_to_bytes(value)
    if _optional(hint) is np.ndarray:
        return array_to_bytes(value)
    return value


def _decode(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if (record := _record_of(hint)) is not None:
        return records_from_bytes(value, record)
    if _optional(hint) is pa.Table:
        return table_from_bytes(value)
    if _optional(hint) is np.ndarray:
        return array_from_bytes(value)
    if _optional(hint) in (int, float) and not isinstance(value, bool):
        return _optional(hint)(value)  # Arrow may hand back numpy scalars
    return value


@dataclass
class PlannedRow:
    """One manifest row as planned into its shard's input file: url is the cell verbatim, source where it
    resolves, error why the row itself is malformed."""

    row: int
    index: int
    id: str | None
    url: str | None
    source: str | None
    reference: str | None
    captions: list[str]
    error: str | None
    duplicate_of: int | None = None  # the row of the run's first row with this URL: its result is this row's
    seen_in: str | None = None  # an earlier output (--skip-seen) that captioned this URL ok


@dataclass
class FetchedRow(PlannedRow):
    """A planned row after fetching and decoding: its status (ok or why not), image size and timings."""

    status: str = "ok"
    sha256: str | None = None  # of the bytes as received
    image_bytes: bytes | None = None  # kept for writers that store images: as fetched, or the model's view
    width: int | None = None
    height: int | None = None
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the row's image was fetched and decoded (it is in the shard's images)."""
        return self.status == "ok"


@dataclass
class ShardInput(Payload):
    """The engine's first payload: which shard to fetch."""

    shard: int


@dataclass
class ShardRows(Payload):
    """What every payload after the fetch stage carries: the shard's rows as fetched, and, on a --retry-failed
    attempt, the rows an earlier attempt committed that this one keeps (in the writer's form)."""

    shard: int
    attempt: int
    first_row: int  # positions in the manifest, checked before _SUCCESS.json
    last_row: int
    rows: list[FetchedRow]
    kept: pa.Table | None
    timing: list[StageRecord]

    @property
    def good(self) -> list[FetchedRow]:
        """The rows whose images were fetched and decoded, in row order."""
        return [r for r in self.rows if r.ok]

    def passed_on(self, *timing: StageRecord) -> dict[str, Any]:
        """This payload's shared fields for the next stage's payload, with that stage's timing added."""
        return {f.name: getattr(self, f.name) for f in fields(ShardRows)} | {"timing": [*self.timing, *timing]}


@dataclass
class FetchedShard(ShardRows):
    """A shard fetched and decoded: every row's status, and the ok rows' images in row order."""

    images: np.ndarray  # uint8 (ok rows, size, size, 3)


@dataclass
class Committed(Payload):
    """The writer's answer for one committed shard: what the driver counts and shows."""

    shard: int
    rows: int  # rows in the shard, kept ones included
    ok: int
    failed: int
    fresh: int  # rows handled by this attempt
    pairs: int = 0  # caption pairs of loaded images (feature shards)


__all__ = ["Committed", "FetchedRow", "FetchedShard", "Payload", "PlannedRow", "ShardInput", "ShardRows", "StageRecord",
           "array_from_bytes", "array_to_bytes", "record_schema", "records_from_bytes", "records_to_bytes",
           "table_from_bytes", "table_to_bytes"]
