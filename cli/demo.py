"""`captioning demo`: the main job on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.options import log


def register(commands: argparse._SubParsersAction) -> None:
    """Add demo."""
    demo = commands.add_parser("demo", help="synthetic data -> train -> caption -> evaluate -> bulk job (the main job)")
    demo.add_argument("--out", default="runs/demo", help="folder for data, model, plots, report and bulk output")
    demo.add_argument("--train", type=int, default=3000, help="synthetic training scenes")
    demo.add_argument("--val", type=int, default=150, help="synthetic validation scenes")
    demo.add_argument("--test", type=int, default=150, help="synthetic held-out scenes (captioned and scored)")
    demo.add_argument("--epochs", type=int, default=12, help="most training epochs (early stopping may end sooner)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the scenes and of training")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """captioning demo."""
    from ops.demo import run_demo  # noqa: PLC0415

    run_demo(Path(args.out), args.train, args.val, args.test, args.epochs, args.seed, log=log)
    return 0
