"""`captioning batch`: dispatches to the bulk job (jobs/batch.py), the very code a submitted job runs."""

from __future__ import annotations

import argparse

from jobs.options import batch_options


def register(commands: argparse._SubParsersAction) -> None:
    """Add batch."""
    batch = commands.add_parser("batch", help="caption a URL manifest on Ray Data into local or S3 storage")
    batch_options(batch)
    batch.set_defaults(handler=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    """captioning batch."""
    from jobs.batch import command  # noqa: PLC0415

    return command(args)
