"""`captioning retrain`: dispatches to the retraining job (jobs/retrain.py), the code a submitted or scheduled
job runs."""

from __future__ import annotations

import argparse

from jobs.options import retrain_options


def register(commands: argparse._SubParsersAction) -> None:
    """Add retrain."""
    retrain = commands.add_parser("retrain", help="train on new manifests under a prefix; promote only if the "
                                  "holdout score holds")
    retrain_options(retrain)
    retrain.set_defaults(handler=run_retrain)


def run_retrain(args: argparse.Namespace) -> int:
    """captioning retrain."""
    from jobs.retrain import command  # noqa: PLC0415

    return command(args)
