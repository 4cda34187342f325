"""The `captioning` command: parses arguments, builds config objects, dispatches. No logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console

from captioning.config import BULK_IMAGE, FetchConfig, ImageConfig, ModelConfig, TrainConfig  # noqa: E402
from captioning.errors import CaptioningError  # noqa: E402


def _log(message: str) -> None:
    print(message, flush=True)


def _manifest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="auto", help="csv, tsv, cc-tsv, jsonl or parquet (default: by extension)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--id-column", default=None)


def _manifest_spec(args: argparse.Namespace):  # noqa: ANN202
    from captioning.manifest import ManifestSpec  # noqa: PLC0415

    return ManifestSpec(args.format, args.image_column, args.caption_column, args.id_column)


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    """argparse type: a finite number of at least 0 (CPU and GPU shares)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def _generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature (> 0)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam search with this many beams")
    parser.add_argument("--top-k", type=int, default=1, help="with --beam-size: also print the k best captions")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="images per model call (default: 32 on CPUs, where it is fastest; 256 on GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                        help="decoder compute precision (auto: mixed on GPUs, float32 on CPUs)")


def _generation_config(args: argparse.Namespace, attention: bool):  # noqa: ANN202
    from captioning.config import GenerationConfig  # noqa: PLC0415

    if args.temperature is not None and args.beam_size is not None:
        raise CaptioningError("--temperature/--beam-size", "choose sampling or beam search, not both")
    try:
        if args.beam_size is not None:
            return GenerationConfig("beam", beam_size=args.beam_size, top_k=args.top_k, attention=attention)
        if args.temperature is not None:
            return GenerationConfig("sample", temperature=args.temperature, attention=attention, seed=args.seed)
        return GenerationConfig("greedy", attention=attention)
    except ValueError as err:
        raise CaptioningError("generation options", str(err)) from None


def _network_args(parser: argparse.ArgumentParser, s3: bool = True) -> None:
    defaults = FetchConfig()
    parser.add_argument("--allow-private-networks", action="store_true",
                        help="let URLs reach private, loopback and link-local addresses (off by default)")
    parser.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                        help="let URLs reach this private network only (repeatable), e.g. 127.0.0.1/32")
    parser.add_argument("--timeout", type=_seconds, default=defaults.read_timeout,
                        help=f"read timeout per request, seconds (default {defaults.read_timeout:g})")
    parser.add_argument("--deadline", type=_seconds, default=defaults.deadline,
                        help=f"total seconds per request, retries and redirects included (default {defaults.deadline:g})")
    if s3:
        parser.add_argument("--s3-endpoint", default=None,
                            help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL or AWS itself)")


def _fetch_config(args: argparse.Namespace) -> FetchConfig:
    return FetchConfig(read_timeout=args.timeout, deadline=args.deadline,
                       allow_private_networks=args.allow_private_networks, allowed_networks=tuple(args.allow_network))


def _storage(args: argparse.Namespace):  # noqa: ANN202
    from captioning.storage import Storage, StorageConfig  # noqa: PLC0415

    return Storage(StorageConfig(s3_endpoint=getattr(args, "s3_endpoint", None)))


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(prog="captioning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate or download datasets").add_subparsers(dest="dataset", required=True)
    synthetic = data.add_parser("synthetic", help="deterministic synthetic captioned scenes")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--train", type=int, default=2000)
    synthetic.add_argument("--val", type=int, default=200)
    synthetic.add_argument("--test", type=int, default=0)
    synthetic.add_argument("--seed", type=int, default=0)
    flickr = data.add_parser("flickr8k", help="download Flickr8k and write train/val/test manifests")
    flickr.add_argument("--out", required=True)
    flickr.add_argument("--base-url", default=None, help="mirror of the Flickr8k zips")
    _network_args(flickr, s3=False)
    cc = data.add_parser("conceptual-captions", help="download Conceptual Captions images from the TSV")
    cc.add_argument("--out", required=True)
    cc.add_argument("--split", choices=["train", "validation"], default="validation")
    cc.add_argument("--limit", type=int, default=None, help="only the first N rows")
    cc.add_argument("--workers", type=int, default=32)
    cc.add_argument("--base-url", default=None, help="mirror of the gcc-data bucket")
    _network_args(cc, s3=False)

    train = commands.add_parser("train", help="train a captioner into a model directory or s3:// prefix")
    train.add_argument("--train", required=True, help="training manifest, or a feature set from `captioning features`")
    train.add_argument("--val", required=True, help="validation manifest or feature set")
    train.add_argument("--out", required=True, help="model folder or s3:// prefix (the same --out resumes a run)")
    _manifest_args(train)
    defaults, model_defaults = TrainConfig(), ModelConfig()
    train.add_argument("--weights", default=defaults.weights, help="backbone weights: imagenet, none, or a file")
    train.add_argument("--backbone", default=model_defaults.backbone)
    train.add_argument("--epochs", type=_positive, default=defaults.epochs)
    train.add_argument("--batch-size", type=_positive, default=defaults.batch_size,
                       help="global batch: caption pairs per step over all workers (default %(default)s)")
    train.add_argument("--learning-rate", type=_seconds, default=defaults.learning_rate,
                       help="Adam learning rate, not scaled with the worker count (default %(default)s)")
    train.add_argument("--patience", type=_positive, default=defaults.patience)
    train.add_argument("--steps-per-epoch", type=_positive, default=None)
    train.add_argument("--max-seconds", type=_seconds, default=None, help="stop after the epoch that uses this up")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--shuffle-buffer", type=_positive, default=defaults.shuffle_buffer,
                       help="caption pairs mixed per worker (about 56 KiB each; default %(default)s)")
    train.add_argument("--checkpoint-every", type=_positive, default=None, metavar="STEPS",
                       help="also checkpoint every this many steps (default: at each epoch end only)")
    train.add_argument("--cache-dir", default=None, help="where features of manifests go (default: <out>/features)")
    train.add_argument("--vocab-size", type=_positive, default=model_defaults.vocab_size)
    train.add_argument("--max-length", type=_positive, default=model_defaults.max_length)
    train.add_argument("--d-model", type=_positive, default=model_defaults.d_model)
    train.add_argument("--layers", type=_positive, default=model_defaults.num_layers)
    train.add_argument("--heads", type=_positive, default=model_defaults.num_heads)
    train.add_argument("--dropout", type=float, default=model_defaults.dropout)
    train.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                       help="decoder compute precision (auto: mixed on GPUs, float16 with loss scaling; float32 on CPUs)")
    train.add_argument("--workers", type=int, default=0,
                       help="Ray Train workers (0: train in this process, the default)")
    train.add_argument("--gpus-per-worker", type=_non_negative, default=0.0)
    train.add_argument("--cpus-per-worker", type=_non_negative, default=1.0)
    train.add_argument("--max-failures", type=int, default=2, help="worker failures a Ray run recovers from")
    train.add_argument("--keep-checkpoints", type=_positive, default=2,
                       help="Ray checkpoints kept, the lowest val_loss first (default 2)")
    train.add_argument("--address", default=None, help="Ray cluster address (default: local Ray in-process)")
    train.add_argument("--no-progress", action="store_true")
    _network_args(train)

    features = commands.add_parser("features", help="backbone features of a manifest into committed shards, on Ray")
    features.add_argument("--manifest", required=True, help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    features.add_argument("--out", "--output", dest="output", required=True, help="output folder or s3:// prefix")
    _manifest_args(features)
    features.add_argument("--weights", default=defaults.weights, help="backbone weights: imagenet, none, or a file")
    features.add_argument("--backbone", default=model_defaults.backbone)
    features.add_argument("--seed", type=int, default=0, help="seed of a --weights none backbone")
    features.add_argument("--shard-size", type=_positive, default=256, help="rows per committed shard")
    features.add_argument("--batch-size", type=_positive, default=64, help="images per backbone call")
    features.add_argument("--actors", type=_positive, default=1, help="backbone actors (each loads it once)")
    features.add_argument("--num-gpus", type=_non_negative, default=0.0, help="GPUs per backbone actor")
    features.add_argument("--actor-cpus", type=_non_negative, default=1.0, help="CPUs Ray reserves per actor")
    features.add_argument("--fetch-threads", type=_positive, default=32, help="concurrent reads per fetch task")
    features.add_argument("--allow-local-files", action="store_true",
                          help="read local paths from a manifest on S3 (a local manifest's own files are read anyway)")
    features.add_argument("--allow-s3-sources", action="store_true",
                          help="read s3:// rows from a local manifest (a manifest on S3 reads its own bucket anyway)")
    features.add_argument("--max-pixels", type=_positive, default=BULK_IMAGE.max_pixels)
    features.add_argument("--decode-memory", type=_positive, default=512, metavar="MIB")
    features.add_argument("--address", default=None, help="Ray cluster address (default: local Ray in-process)")
    features.add_argument("--no-progress", action="store_true")
    _network_args(features)

    caption = commands.add_parser("caption", help="caption images or URLs with a model directory")
    caption.add_argument("model")
    caption.add_argument("sources", nargs="+", metavar="IMAGE_OR_URL")
    caption.add_argument("--attention-plot", default=None, metavar="OUT.png",
                         help="word-by-word attention grid (OUT-N.png per image when several)")
    caption.add_argument("--json", action="store_true", help="one JSON object per line")
    _generation_args(caption)
    _network_args(caption)

    evaluate = commands.add_parser("evaluate", help="BLEU, CIDEr and METEOR on a captioned manifest")
    evaluate.add_argument("model")
    evaluate.add_argument("manifest")
    evaluate.add_argument("--out", required=True, help="report JSON")
    evaluate.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    _manifest_args(evaluate)
    _generation_args(evaluate)
    _network_args(evaluate)

    batch = commands.add_parser("batch", help="caption a URL manifest on Ray Data into local or S3 storage")
    batch.add_argument("--manifest", required=True, help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    batch.add_argument("--model", required=True, help="model bundle directory or s3:// prefix")
    batch.add_argument("--output", required=True, help="output directory or s3:// prefix")
    batch.add_argument("--format", default="auto")
    batch.add_argument("--url-column", default="url")
    batch.add_argument("--id-column", default=None)
    batch.add_argument("--caption-column", default="caption", help="reference caption, kept in the output")
    batch.add_argument("--shard-size", type=_positive, default=256, help="rows per committed output shard")
    batch.add_argument("--actors", type=_positive, default=1, help="captioning actors (each loads the model once)")
    batch.add_argument("--num-gpus", type=_non_negative, default=0.0, help="GPUs per captioning actor")
    batch.add_argument("--actor-cpus", type=_non_negative, default=1.0, help="CPUs Ray reserves per captioning actor")
    batch.add_argument("--inference-threads", type=_positive, default=None,
                       help="TensorFlow threads per captioning actor (default: all CPUs of its node)")
    batch.add_argument("--fetch-threads", type=_positive, default=32, help="concurrent requests per fetch task")
    batch.add_argument("--no-attention", action="store_true", help="skip attention maps")
    batch.add_argument("--attention-png", type=int, default=0, metavar="N",
                       help="also write overlay PNGs for the first N manifest rows")
    batch.add_argument("--retry-failed", action="store_true", help="redo only rows with transient failures")
    batch.add_argument("--allow-local-files", action="store_true",
                       help="also read rows that are local paths or file:// URIs (off: a URL job reads no local file)")
    batch.add_argument("--allow-s3-sources", action="store_true",
                       help="also read s3:// rows, with this job's credentials (off by default)")
    batch.add_argument("--max-pixels", type=_positive, default=BULK_IMAGE.max_pixels,
                       help=f"refuse images with more pixels than this (default {BULK_IMAGE.max_pixels:,})")
    batch.add_argument("--decode-memory", type=_positive, default=512, metavar="MIB",
                       help="decoded-image memory one fetch task may hold at once, MiB (default 512)")
    batch.add_argument("--address", default=None, help="Ray cluster address (default: local Ray in-process)")
    batch.add_argument("--no-progress", action="store_true")
    _generation_args(batch)
    _network_args(batch)

    storage = commands.add_parser("storage", help="local S3-compatible storage").add_subparsers(
        dest="action", required=True)
    serve = storage.add_parser("serve", help="run SeaweedFS on loopback until interrupted")
    serve.add_argument("--dir", required=True, help="data directory")
    serve.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    serve.add_argument("--port", type=int, default=None, help="S3 port (default: a free one outside Ray's range)")

    demo = commands.add_parser("demo", help="synthetic data -> train -> caption -> evaluate -> bulk job (the main job)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--train", type=int, default=3000)
    demo.add_argument("--val", type=int, default=150)
    demo.add_argument("--test", type=int, default=150)
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line per error, non-zero exit when anything failed."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CaptioningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_data(args: argparse.Namespace) -> int:
    """captioning data synthetic|flickr8k|conceptual-captions."""
    if args.dataset == "synthetic":
        from captioning.datasets import synthetic  # noqa: PLC0415

        splits = {"train": args.train, "val": args.val, **({"test": args.test} if args.test else {})}
        for split, path in synthetic.generate(args.out, splits, seed=args.seed).items():
            _log(f"{split}: {path}")
    elif args.dataset == "flickr8k":
        from captioning.datasets import flickr8k  # noqa: PLC0415

        flickr8k.download(args.out, args.base_url or flickr8k.DEFAULT_BASE_URL, _fetch_config(args), log=_log)
    else:
        from captioning.datasets import conceptual_captions as cc  # noqa: PLC0415

        cc.download(args.out, args.split, args.limit, args.base_url or cc.DEFAULT_BASE_URL, _fetch_config(args),
                    workers=args.workers, log=_log)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """captioning train: in this process, or on Ray Train with --workers."""
    model = ModelConfig(vocab_size=args.vocab_size, max_length=args.max_length, d_model=args.d_model,
                        num_layers=args.layers, num_heads=args.heads, dropout=args.dropout, backbone=args.backbone)
    if args.d_model % args.heads:
        raise CaptioningError("--d-model", f"{args.d_model} is not divisible by --heads {args.heads}")
    if args.workers < 0:
        raise CaptioningError("--workers", f"expected 0 (this process) or more, got {args.workers}")
    storage = _storage(args)
    config = TrainConfig(model=model, weights=args.weights, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, patience=args.patience, seed=args.seed,
                         shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
                         precision=args.precision,
                         max_seconds=args.max_seconds, cache_dir=args.cache_dir, steps_per_epoch=args.steps_per_epoch,
                         fetch=_fetch_config(args), storage=storage.config)
    spec = _manifest_spec(args)
    if args.workers:
        from jobs.train import Scaling, run  # noqa: PLC0415

        scaling = Scaling(args.workers, args.gpus_per_worker, args.cpus_per_worker, args.max_failures,
                          args.keep_checkpoints)
        result = run(args.train, args.val, args.out, config, scaling, spec, args.address, log=_log,
                     progress=not args.no_progress)
        _log(f"model {result['version']} written to {args.out} (best epoch {result['best_epoch']}, "
             f"{result['restores']} restore(s))")
        return 0
    from captioning.train import train  # noqa: PLC0415

    done = train(args.train, args.val, args.out, config, spec, progress=not args.no_progress, log=_log)
    _log(f"model {done.version} written to {done.bundle} (best epoch {done.best_epoch})")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """captioning features: dispatches to the Ray Data job."""
    from dataclasses import replace  # noqa: PLC0415

    from captioning.featureset import FeaturesConfig  # noqa: PLC0415
    from jobs.features import run  # noqa: PLC0415

    config = FeaturesConfig.reading_own_kind(
        args.manifest, args.output, spec=_manifest_spec(args), backbone=args.backbone, weights=args.weights,
        seed=args.seed, shard_size=args.shard_size, batch_size=args.batch_size, actors=args.actors,
        actor_cpus=args.actor_cpus, num_gpus=args.num_gpus, fetch_threads=args.fetch_threads,
        allow_local_files=args.allow_local_files, allow_s3_sources=args.allow_s3_sources,
        decode_memory=args.decode_memory * 1024 * 1024, fetch=_fetch_config(args),
        image=replace(BULK_IMAGE, max_pixels=args.max_pixels, max_decode_bytes=args.max_pixels * 8),
        storage=_storage(args).config)
    run(config, address=args.address, log=_log, progress=not args.no_progress)
    return 0  # every row is committed; failed rows are recorded with their status, not a failed job


def cmd_caption(args: argparse.Namespace) -> int:
    """captioning caption: one line per source, errors on stderr."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.inference import caption_sources  # noqa: PLC0415
    from captioning.plots import plot_attention  # noqa: PLC0415

    storage = _storage(args)
    bundle = load_bundle(args.model, precision=args.precision, storage=storage)
    plot = args.attention_plot
    generation = _generation_config(args, attention=bool(plot))
    results = caption_sources(bundle, args.sources, generation, ImageConfig(), Fetcher(_fetch_config(args)),
                              args.batch_size, keep_images=bool(plot), storage=storage)
    failed = 0
    for index, result in enumerate(results):
        if result.error:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
            continue
        if args.json:
            _log(json.dumps({"source": result.source, "caption": result.caption, "score": result.score,
                             "alternatives": result.alternatives}))
        else:
            _log(f"{result.source}\t{result.caption}")
            for alternative, score in (result.alternatives or [])[1:]:
                _log(f"  alt ({score:.3f})\t{alternative}")
        if plot:
            out = Path(plot) if len(args.sources) == 1 else Path(plot).with_name(f"{Path(plot).stem}-{index}.png")
            plot_attention(result.image, result.caption.split(), result.attention, out, result.caption)
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """captioning evaluate: writes the report, prints the scores."""
    from captioning.bundle import load_bundle  # noqa: PLC0415
    from captioning.evaluate import evaluate, format_scores  # noqa: PLC0415
    from captioning.fetch import Fetcher  # noqa: PLC0415
    from captioning.manifest import read_manifest  # noqa: PLC0415

    storage = _storage(args)
    bundle = load_bundle(args.model, precision=args.precision, storage=storage)
    manifest = read_manifest(args.manifest, _manifest_spec(args), storage=storage)
    report = evaluate(bundle, manifest, _generation_config(args, attention=False), ImageConfig(),
                      Fetcher(_fetch_config(args)), args.batch_size, meteor=not args.no_meteor, log=_log,
                      storage=storage)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    _log(format_scores(report["scores"]))
    return 1 if report["failures"] else 0


def cmd_batch(args: argparse.Namespace) -> int:
    """captioning batch: dispatches to the Ray job."""
    from dataclasses import replace  # noqa: PLC0415

    from captioning.bulk import BulkConfig  # noqa: PLC0415
    from captioning.config import StorageConfig  # noqa: PLC0415
    from captioning.manifest import ManifestSpec  # noqa: PLC0415
    from jobs.batch import run  # noqa: PLC0415

    config = BulkConfig(
        manifest=args.manifest, model=args.model, output=args.output,
        spec=ManifestSpec(args.format, args.url_column, args.caption_column, args.id_column),
        shard_size=args.shard_size, batch_size=args.batch_size, actors=args.actors, num_gpus=args.num_gpus,
        inference_threads=args.inference_threads, actor_cpus=args.actor_cpus,
        fetch_threads=args.fetch_threads, attention=not args.no_attention, attention_png=args.attention_png,
        retry_failed=args.retry_failed, precision=args.precision, fetch=_fetch_config(args),
        allow_local_files=args.allow_local_files, allow_s3_sources=args.allow_s3_sources,
        image=replace(BULK_IMAGE, max_pixels=args.max_pixels, max_decode_bytes=args.max_pixels * 8),
        decode_memory=args.decode_memory * 1024 * 1024,
        generation=_generation_config(args, attention=not args.no_attention),
        storage=StorageConfig(s3_endpoint=args.s3_endpoint),
    )
    run(config, address=args.address, log=_log, progress=not args.no_progress)
    return 0  # every row is committed; failed rows are output rows with their status, not a failed job


def cmd_storage(args: argparse.Namespace) -> int:
    """captioning storage serve: SeaweedFS until Ctrl+C or SIGTERM; the secret goes to a 0600 file, not the log."""
    import signal  # noqa: PLC0415

    from captioning.atomic import atomic_write  # noqa: PLC0415
    from captioning.seaweed import PORT_FLAGS, SeaweedServer, free_ports  # noqa: PLC0415

    data = Path(args.dir)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    if args.port:
        ports["s3.port"] = args.port
    keys = {k: os.environ[v] for k, v in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"))
            if os.environ.get(v)}
    server = SeaweedServer(data, ports=ports, **keys)
    signal.signal(signal.SIGTERM, _interrupt)
    with server.start():
        for bucket in args.bucket:
            server.create_bucket(bucket)
        env_file = data / "credentials.env"
        # 0600 even when an older file was there: it holds the secret key.
        atomic_write(env_file, "".join(f"export {k}={v}\n" for k, v in server.env().items()).encode(), mode=0o600)
        _log(f"S3 endpoint {server.endpoint} (access key {server.access_key}); "
             f"credentials: source {env_file}; stop with Ctrl+C")
        try:
            server.process.wait()
        except KeyboardInterrupt:
            _log("stopping")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults until the bulk job exists."""
    from jobs.demo import run_demo  # noqa: PLC0415

    run_demo(Path(args.out), args.train, args.val, args.test, args.epochs, args.seed, log=_log)
    return 0


COMMANDS = {"data": cmd_data, "train": cmd_train, "features": cmd_features, "caption": cmd_caption, "evaluate": cmd_evaluate,
            "batch": cmd_batch, "storage": cmd_storage, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
