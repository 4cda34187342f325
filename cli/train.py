"""`captioning train` and `captioning features`: both dispatch to their job (jobs/train.py, jobs/features.py),
the very code a submitted job runs."""

from __future__ import annotations

import argparse

from jobs.options import features_options, train_options


def register(commands: argparse._SubParsersAction) -> None:
    """Add train and features."""
    train = commands.add_parser("train", help="train a captioner into a model directory or s3:// prefix")
    train_options(train)
    train.set_defaults(handler=run_train)
    features = commands.add_parser("features", help="backbone features of a manifest into committed shards, on Ray")
    features_options(features)
    features.set_defaults(handler=run_features)


def run_train(args: argparse.Namespace) -> int:
    """captioning train: in this process, or on Ray Train with --workers."""
    from jobs.train import command  # noqa: PLC0415

    return command(args)


def run_features(args: argparse.Namespace) -> int:
    """captioning features: the Ray Data features job."""
    from jobs.features import command  # noqa: PLC0415

    return command(args)
