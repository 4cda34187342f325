"""Names under a sharded job's output URI, shared by the engine, its plug-ins and whoever reads an output."""

from __future__ import annotations

import hashlib
import re

PLAN = "_plan.json"  # what the output was planned from: a rerun with anything else is refused
INPUT = "_input"  # _input/shard-NNNNN.jsonl: the manifest rows of each shard, written by planning
COMMITTED = "_committed"  # _committed/shard-NNNNN.json: commit markers, written last
SUCCESS = "_SUCCESS.json"  # the summary of the run that found every shard committed
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


def uri(output: str, *parts: str) -> str:
    """Join an output URI and path parts."""
    return "/".join([output.rstrip("/"), *parts])


def shard_name(shard: int) -> str:
    """File stem of a shard."""
    return f"shard-{shard:05d}"


def marker_uri(output: str, shard: int) -> str:
    """Where a shard's commit marker lives."""
    return uri(output, COMMITTED, f"{shard_name(shard)}.json")


def input_uri(output: str, shard: int) -> str:
    """Where a shard's planned input rows live."""
    return uri(output, INPUT, f"{shard_name(shard)}.jsonl")


def file_id(row_id: str) -> str:
    """A row id as a file name: kept when plainly safe, else hashed (ids come from the manifest)."""
    if SAFE_ID.match(row_id) and row_id not in (".", ".."):
        return row_id
    return "id-" + hashlib.sha256(row_id.encode()).hexdigest()[:20]
