"""Bulk captioning on Ray Data: the captioning plug-in (captioning/bulk.py) on the sharded-job driver."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from captioning.bulk import BulkConfig, Captioning
from jobs.options import batch_options, bulk_config, guarded, job_parser, log, show_progress
from jobs import driver
from jobs.ray_setup import CONNECT_TIMEOUT


def run(config: BulkConfig, address: str | None = None, log: Callable[[str], None] = print,
        connect_timeout: float = CONNECT_TIMEOUT, progress: bool = True) -> dict:
    """Caption every manifest row into config.output exactly once; returns the _SUCCESS summary."""
    return driver.run(Captioning(), config, address, log, connect_timeout, progress)


def command(args: argparse.Namespace) -> int:
    """`captioning batch` and `python -m jobs.batch`: one run from the parsed options."""
    run(bulk_config(args), address=args.address, log=log, connect_timeout=args.connect_timeout,
        progress=show_progress(args))
    return 0  # every row is committed; failed rows are output rows with their status, not a failed job


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted batch job: the local command's options, one `error:` line on failure."""
    args = job_parser("python -m jobs.batch", __doc__, batch_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
