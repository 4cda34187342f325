"""`captioning caption` and `captioning evaluate`: a model bundle on images, in this process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioning.atomic import atomic_write
from captioning.config import ImageConfig
from jobs.options import (fetch_config, generation_config, generation_options, log, manifest_options,
                                manifest_spec, network_options, storage_config)
from jobs.options import result as output


def register(commands: argparse._SubParsersAction) -> None:
    """Add caption and evaluate."""
    caption = commands.add_parser("caption", help="caption images or URLs with a model directory")
    caption.add_argument("model", help="bundle folder, s3:// prefix, or registry+URI[@vNNNN] (its current version)")
    caption.add_argument("sources", nargs="+", metavar="IMAGE_OR_URL", help="image files, http(s) URLs or s3:// URIs")
    caption.add_argument("--attention-plot", default=None, metavar="OUT.png",
                         help="word-by-word attention grid (OUT-N.png per image when several)")
    caption.add_argument("--json", action="store_true", help="one JSON object per line")
    generation_options(caption)
    network_options(caption)
    caption.set_defaults(handler=run_caption)

    evaluate = commands.add_parser("evaluate", help="BLEU, CIDEr and METEOR on a captioned manifest")
    evaluate.add_argument("model", help="bundle folder, s3:// prefix, or registry+URI[@vNNNN]")
    evaluate.add_argument("manifest", help="manifest of images with reference captions (local or s3://)")
    evaluate.add_argument("--out", required=True, help="report JSON")
    evaluate.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    manifest_options(evaluate)
    generation_options(evaluate)
    network_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def _model(model: str, storage) -> str:  # noqa: ANN001
    """The bundle to load: --model as given, or a registry's current (or pinned) version, resolved once."""
    from captioning.registry import is_registry_ref, resolve_model  # noqa: PLC0415

    if not is_registry_ref(model):
        return model
    found = resolve_model(model, storage)
    print(f"model {found.ref}", file=sys.stderr)
    return found.bundle


def run_caption(args: argparse.Namespace) -> int:
    """captioning caption: one line per source, errors on stderr."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.inference import caption_sources  # noqa: PLC0415
    from captioning.plots import plot_attention  # noqa: PLC0415
    from captioning.storage import Storage  # noqa: PLC0415

    storage = Storage(storage_config(args))
    bundle = load_bundle(_model(args.model, storage), precision=args.precision, storage=storage)
    plot = args.attention_plot
    generation = generation_config(args, attention=bool(plot))
    results = caption_sources(bundle, args.sources, generation, ImageConfig(), Fetcher(fetch_config(args)),
                              args.batch_size, keep_images=bool(plot), storage=storage)
    failed = 0
    for index, result in enumerate(results):
        if result.error:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
            continue
        if args.json:
            output(json.dumps({"source": result.source, "caption": result.caption, "score": result.score,
                            "alternatives": result.alternatives}))
        else:
            output(f"{result.source}\t{result.caption}")
            for alternative, score in (result.alternatives or [])[1:]:
                output(f"  alt ({score:.3f})\t{alternative}")
        if plot:
            out = Path(plot) if len(args.sources) == 1 else Path(plot).with_name(f"{Path(plot).stem}-{index}.png")
            plot_attention(result.image, result.caption.split(), result.attention, out, result.caption)
    return 1 if failed else 0


def run_evaluate(args: argparse.Namespace) -> int:
    """captioning evaluate: writes the report, prints the scores."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.evaluate import evaluate, format_scores  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415
    from captioning.storage import Storage  # noqa: PLC0415

    storage = Storage(storage_config(args))
    bundle = load_bundle(_model(args.model, storage), precision=args.precision, storage=storage)
    manifest = read_manifest(args.manifest, manifest_spec(args), storage=storage)
    report = evaluate(bundle, manifest, generation_config(args, attention=False), ImageConfig(),
                      Fetcher(fetch_config(args)), args.batch_size, meteor=not args.no_meteor, log=log,
                      storage=storage)
    atomic_write(Path(args.out), json.dumps(report, indent=2).encode())
    output(format_scores(report["scores"]))
    return 1 if report["failures"] else 0
