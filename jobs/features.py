"""Backbone features on Ray Data: the features plug-in (captioning/featureset.py) on the sharded-job driver.
`captioning train` runs the same stages in-process (captioning.featureset.extract_features)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from captioning.featureset import Features, FeaturesConfig
from jobs.options import features_config, features_options, guarded, job_parser, log, show_progress
from jobs import driver
from jobs.ray_setup import CONNECT_TIMEOUT


def run(config: FeaturesConfig, address: str | None = None, log: Callable[[str], None] = print,
        connect_timeout: float = CONNECT_TIMEOUT, progress: bool = True, backbone: Any = None) -> dict:
    """Features for every manifest row, each shard committed exactly once; returns the _SUCCESS summary.
    backbone: an already-built one to use (default: the configured one)."""
    return driver.run(Features(backbone), config, address, log, connect_timeout, progress)


def command(args: argparse.Namespace) -> int:
    """`captioning features` and `python -m jobs.features`: one run from the parsed options."""
    run(features_config(args), address=args.address, log=log, connect_timeout=args.connect_timeout,
        progress=show_progress(args))
    return 0  # every row is committed; failed rows are recorded with their status, not a failed job


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of a submitted features job: the local command's options, one `error:` line on failure."""
    args = job_parser("python -m jobs.features", __doc__, features_options).parse_args(argv)
    return guarded(lambda: command(args), args)


if __name__ == "__main__":
    sys.exit(main())
