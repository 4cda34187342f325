"""`captioning data synthetic|flickr8k|conceptual-captions`: make or download datasets."""

from __future__ import annotations

import argparse

from captioning.config import PolitenessConfig
from jobs.options import (config_options, fetch_config, log, network_options, non_negative_int, politeness_config,
                          positive, result)


def register(commands: argparse._SubParsersAction) -> None:
    """Add the data command group."""
    data = commands.add_parser("data", help="generate or download datasets").add_subparsers(dest="dataset", required=True)
    synthetic = data.add_parser("synthetic", help="deterministic synthetic captioned scenes")
    synthetic.add_argument("--out", required=True, help="folder for images/ and the split manifests")
    synthetic.add_argument("--train", type=non_negative_int, default=2000, help="training scenes")
    synthetic.add_argument("--val", type=non_negative_int, default=200, help="validation scenes")
    synthetic.add_argument("--test", type=non_negative_int, default=0, help="test scenes")
    synthetic.add_argument("--seed", type=non_negative_int, default=0, help="seed of the scenes (the same seed, the same files)")
    synthetic.set_defaults(handler=run_synthetic)
    flickr = data.add_parser("flickr8k", help="download Flickr8k and write train/val/test manifests")
    flickr.add_argument("--out", required=True, help="folder for the images and train/val/test manifests")
    flickr.add_argument("--base-url", default=None, help="mirror of the Flickr8k zips")
    network_options(flickr, s3=False)
    flickr.set_defaults(handler=run_flickr8k)
    cc = data.add_parser("conceptual-captions", help="download Conceptual Captions images from the TSV")
    cc.add_argument("--out", required=True, help="folder for the fetched images and a manifest of them")
    cc.add_argument("--split", choices=["train", "validation"], default="validation", help="which TSV to read")
    cc.add_argument("--limit", type=positive, default=None, help="only the first N rows")
    cc.add_argument("--workers", type=positive, default=32, help="concurrent downloads")
    cc.add_argument("--base-url", default=None, help="mirror of the gcc-data bucket")
    network_options(cc, s3=False)
    config_options(cc, PolitenessConfig)
    cc.set_defaults(handler=run_conceptual_captions)


def run_synthetic(args: argparse.Namespace) -> int:
    """captioning data synthetic."""
    from captioning.datasets import synthetic  # noqa: PLC0415

    splits = {"train": args.train, "val": args.val, **({"test": args.test} if args.test else {})}
    for split, path in synthetic.generate(args.out, splits, seed=args.seed).items():
        result(f"{split}: {path}")
    return 0


def run_flickr8k(args: argparse.Namespace) -> int:
    """captioning data flickr8k."""
    from captioning.datasets import flickr8k  # noqa: PLC0415

    flickr8k.download(args.out, args.base_url or flickr8k.DEFAULT_BASE_URL, fetch_config(args), log=log)
    return 0


def run_conceptual_captions(args: argparse.Namespace) -> int:
    """captioning data conceptual-captions."""
    from captioning.datasets import conceptual_captions as cc  # noqa: PLC0415

    cc.download(args.out, args.split, args.limit, args.base_url or cc.DEFAULT_BASE_URL, fetch_config(args),
                workers=args.workers, log=log, politeness=politeness_config(args))
    return 0
