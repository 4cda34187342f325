"""The `captioning` command: builds the parser from the command groups and runs the chosen one."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs.options import HelpFormatter, Parser, console_options, guarded
from cli import batch, data, demo, inference, models, retrain, schedule, storage, submit, train
from cli.examples import EXAMPLES

GROUPS = (data, train, inference, batch, submit, models, retrain, schedule, storage, demo)


def build_parser() -> argparse.ArgumentParser:
    """Every command group's subcommands and options."""
    parser = Parser(
        prog="captioning", description="Train an image captioner and caption image manifests at scale on Ray.",
        epilog="example:\n  captioning demo --out runs/demo\n\n`captioning COMMAND --help` explains each command.",
        formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    for command in commands_of(parser):
        console_options(command)
        command.formatter_class = HelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[command.prog.removeprefix('captioning ')]}"
    return parser


def commands_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's own parser (the leaves below the subcommand groups)."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        return [parser]
    return [leaf for group in groups for child in dict.fromkeys(group.choices.values()) for leaf in commands_of(child)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line per error, non-zero exit when anything failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is passed through untouched (a submitted job's own options).
    passed = argv[argv.index("--") + 1:] if "--" in argv else None
    args = build_parser().parse_args(argv[:argv.index("--")] if passed is not None else argv)
    args.passed = passed
    return guarded(lambda: args.handler(args), args)


if __name__ == "__main__":
    sys.exit(main())
