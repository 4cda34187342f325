"""JSON Schemas of the small objects the project keeps in storage (registry versions, the current pointer,
history events, schedules, ticks, job records), checked on every read: a malformed object is one clear error
naming it, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from captioning.errors import CaptioningError

VERSION_PATTERN = r"^v[0-9]{4,}\Z"  # jsonschema searches with Python's re: \Z, not $ (which allows a newline)
_VERSION = {"type": "string", "pattern": VERSION_PATTERN}
_OPTIONAL_VERSION = {"anyOf": [_VERSION, {"type": "null"}]}
_TEXT = {"type": "string"}
_SCORES = {"anyOf": [{"type": "null"}, {"type": "object",
                                        "additionalProperties": {"type": ["number", "null"]}}]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "version": {
        "type": "object", "required": ["version"],
        "properties": {
            "version": _VERSION, "parent": _OPTIONAL_VERSION, "created": _TEXT, "by": _TEXT,
            "decision": _TEXT, "promoted": {"type": "boolean"}, "failed": {"type": "boolean"},
            "train_rows": {"type": "integer", "minimum": 0},
            "manifests": {"type": "array", "items": {"type": "object", "required": ["uri"],
                                                     "properties": {"uri": _TEXT}}},
            "holdout": {"type": "object", "properties": {"manifest": _TEXT, "scores": _SCORES,
                                                         "parent_scores": _SCORES}},
        },
    },
    "current": {
        "type": "object", "required": ["version"],
        "properties": {"version": _VERSION, "previous": _OPTIONAL_VERSION, "at": _TEXT, "by": _TEXT,
                       "reason": _TEXT, "action": _TEXT},
    },
    "event": {
        "type": "object", "required": ["at", "by", "event", "version"],
        "properties": {"at": _TEXT, "by": _TEXT, "event": _TEXT, "version": _VERSION,
                       "previous": _OPTIONAL_VERSION, "parent": _OPTIONAL_VERSION, "reason": _TEXT},
    },
    "schedule": {
        "type": "object", "required": ["cron", "kind", "args", "since"],
        "properties": {"cron": _TEXT, "kind": _TEXT, "args": {"type": "array", "items": _TEXT},
                       "since": {"type": "number"}},
    },
    "tick": {
        "type": "object", "required": ["tick", "decision"],
        "properties": {"tick": _TEXT, "decision": {"enum": ["starting", "started", "skipped", "failed"]},
                       "reason": _TEXT, "run": {"type": "object"}, "by_process": {"type": "object"}},
    },
    "job": {
        "type": "object",
        "required": ["job_id", "kind", "name", "args", "address", "commit", "dirty", "submitted_at", "submitted_by"],
        "additionalProperties": False,
        "properties": {**{name: _TEXT for name in ("job_id", "kind", "name", "address", "commit", "dirty",
                                                   "submitted_at", "submitted_by", "state", "message",
                                                   "finished_at")},
                       "args": {"type": "array", "items": _TEXT},
                       "extra": {"type": "object", "additionalProperties": _TEXT}},
    },
}
NAMES = {"version": "registry version record", "current": "registry current pointer",
         "event": "registry history event", "schedule": "schedule record", "tick": "schedule tick record",
         "job": "job record"}


def schema_error(value: object, schema: dict[str, Any]) -> str | None:
    """The first place where value does not fit schema, as `field: message`, or None when it fits."""
    import jsonschema  # noqa: PLC0415

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    where = ".".join(str(part) for part in error.absolute_path) or "top level"
    return f"{where}: {error.message}"


def parse_record(source: str, data: bytes, kind: str) -> dict[str, Any]:
    """The JSON object of a stored record of this kind, checked against its schema; CaptioningError otherwise."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CaptioningError(source, f"is not a valid {NAMES[kind]}: not JSON ({err})") from None
    problem = schema_error(value, SCHEMAS[kind])
    if problem is not None:
        raise CaptioningError(source, f"is not a valid {NAMES[kind]}: {problem[:300]}")
    return value
