"""The `captioning` command: builds the parser from the command groups and runs the chosen one."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console

from captioning.options import guarded  # noqa: E402
from cli import batch, data, demo, inference, models, retrain, schedule, storage, submit, train  # noqa: E402

GROUPS = (data, train, inference, batch, submit, models, retrain, schedule, storage, demo)


def build_parser() -> argparse.ArgumentParser:
    """Every command group's subcommands and options."""
    parser = argparse.ArgumentParser(
        prog="captioning", description="Train an image captioner and caption image manifests at scale on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line per error, non-zero exit when anything failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is passed through untouched (a submitted job's own options).
    passed = argv[argv.index("--") + 1:] if "--" in argv else None
    args = build_parser().parse_args(argv[:argv.index("--")] if passed is not None else argv)
    args.passed = passed
    return guarded(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
