"""`captioning batch`: dispatches to the bulk job (jobs/batch.py), the very code a submitted job runs; `captioning
status`: the progress of a sharded job's output, from its markers."""

from __future__ import annotations

import argparse

from captioning.config import StorageConfig
from jobs.options import batch_options, config_options


def register(commands: argparse._SubParsersAction) -> None:
    """Add batch."""
    batch = commands.add_parser("batch", help="caption a URL manifest on Ray Data into local or S3 storage")
    batch_options(batch)
    batch.set_defaults(handler=run_batch)
    status = commands.add_parser("status", help="the progress of a batch or features job (running or finished) "
                                 "from its output: rows done, rate, statuses, ETA")
    status.add_argument("output", help="the job's --output (local folder or s3://)")
    status.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    config_options(status, StorageConfig)
    status.set_defaults(handler=run_status)


def run_batch(args: argparse.Namespace) -> int:
    """captioning batch."""
    from jobs.batch import command  # noqa: PLC0415

    return command(args)


def run_status(args: argparse.Namespace) -> int:
    """captioning status."""
    import json  # noqa: PLC0415

    from captioning.shards.status import describe, job_status  # noqa: PLC0415
    from captioning.storage import Storage  # noqa: PLC0415
    from jobs.options import storage_config  # noqa: PLC0415

    status = job_status(args.output, Storage(storage_config(args)))
    print(json.dumps(status, indent=2) if args.json else "\n".join(describe(status)))
    return 0
