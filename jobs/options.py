"""Command-line options and the configs they build: one definition per option set, shared by the `captioning`
command and the job entrypoints (`python -m jobs.batch ...`), so a submitted job parses exactly like the local
command. Argparse only; nothing here imports TensorFlow or Ray.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
import re
import sys
from typing import Any, Callable

from captioning.config import (BACKBONE_CHANNELS, BULK_IMAGE, FetchConfig, GenerationConfig, ModelConfig, Scaling,
                               StorageConfig, TrainConfig, bulk_image)
from captioning.shards import defaults
from jobs.ray_setup import CONNECT_TIMEOUT
from captioning import console
from captioning.errors import CaptioningError, captioning_cause
from captioning.redaction import printable, redact_text

PRECISIONS = ["auto", "float32", "mixed_float16", "mixed_bfloat16"]
BACKBONE_NAMES = list(BACKBONE_CHANNELS)
MIB = 1024 * 1024


def log(message: str) -> None:
    """A line about the work (not its result): logged at info, or warning for `warning: ...` lines."""
    if not console.log.handlers:  # a caller that skipped guarded(args): still shown
        console.setup()
    if message.startswith("warning: "):
        console.log.warning(message[len("warning: "):])
    else:
        console.log.info(message)


def result(message: str) -> None:
    """The command's own output (what it made, where): stdout, flushed, control characters escaped."""
    print(printable(message), flush=True)


def console_options(parser: argparse.ArgumentParser) -> None:
    """--verbose and --log-level, on every command."""
    output = group(parser, "output")
    output.add_argument("--verbose", action="store_true",
                       help=f"also show TensorFlow's and Ray's start-up logs (or set {console.VERBOSE_ENV}=1)")
    output.add_argument("--log-level", choices=console.LEVELS, default=None,
                       help=f"least important messages shown (default: {console.LEVEL_ENV}, else info)")


def guarded(command: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    """Run a command (after setting up its console from args): a CaptioningError becomes one `error:` line and
    exit code 2, Ctrl+C exit code 130."""
    if args is not None:
        console.setup(getattr(args, "log_level", None), getattr(args, "verbose", False))
    try:
        return command()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (only ours become one line; anything else is a bug: traceback)
        cause = captioning_cause(err)
        if cause is None:
            raise
        # One line, whatever Ray wrapped around it (its remote traceback is in the job's worker logs).
        line = redact_text(f"{cause.source}: {' '.join(cause.message.split())}")
        print(f"error: {printable(line)}", file=sys.stderr)
        return 2


def show_progress(args: argparse.Namespace) -> bool:
    """Progress unless --no-progress: bars on a terminal, plain lines in a log file (console.progress)."""
    return not args.no_progress


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _number(text: str, fits: Callable[[float], bool], expected: str) -> float:
    """A finite float that fits, else argparse's error saying what was expected."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not fits(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type: a finite number above zero (seconds, rates)."""
    return _number(text, lambda v: v > 0, "a number above 0")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return int(text)


def drop(text: str) -> float:
    """argparse type: a relative drop, a number in [0, 1)."""
    return _number(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def share(text: str) -> float:
    """argparse type: a share, a number in (0, 1]."""
    return _number(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def non_negative(text: str) -> float:
    """argparse type: a finite number of at least 0 (CPU and GPU shares)."""
    return _number(text, lambda v: v >= 0, "a number of at least 0")


# Shared option groups ---------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (unless it already says it); the example below stays as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unset:
            return text
        return f"{text} (default: %(default)s)"


def group(parser: Any, title: str) -> Any:
    """The parser's option group with this title (made once), so shared option sets land in the right section."""
    for existing in getattr(parser, "_action_groups", []):
        if existing.title == title:
            return existing
    return parser.add_argument_group(title)


def manifest_options(parser: argparse.ArgumentParser, image: str = "image",
                     caption_help: str = "column with the reference caption") -> None:
    """--format and the column names of a manifest; image: the image column's default (--url-column when "url")."""
    data = group(parser, "data")
    data.add_argument("--format", default="auto",
                      help="csv, tsv, cc-tsv, jsonl or parquet (default: by the file's extension)")
    if image == "url":
        data.add_argument("--url-column", dest="image_column", metavar="URL_COLUMN", default="url",
                          help="column with the image URL")
    else:
        data.add_argument("--image-column", default=image, help="column with the image path or URL")
    data.add_argument("--caption-column", default="caption", help=caption_help)
    data.add_argument("--id-column", default=None, help="column with a row id (default: the row number)")


def manifest_spec(args: argparse.Namespace) -> Any:
    """The ManifestSpec of manifest_options."""
    from captioning.manifest import ManifestSpec  # noqa: PLC0415

    return ManifestSpec(args.format, args.image_column, args.caption_column, args.id_column)


def generation_options(parser: argparse.ArgumentParser) -> None:
    """Greedy, sampling or beam search, batch size and precision."""
    generation = group(parser, "generation")
    generation.add_argument("--temperature", type=float, default=None,
                            help="sample with this temperature (> 0) instead of greedy decoding")
    generation.add_argument("--beam-size", type=int, default=None, help="beam search with this many beams")
    generation.add_argument("--top-k", type=int, default=1, help="with --beam-size: also print the k best captions")
    generation.add_argument("--batch-size", type=positive, default=None,
                            help="images per model call (default: 32 on CPUs, where it is fastest; 256 on GPUs)")
    generation.add_argument("--seed", type=int, default=0, help="seed of --temperature sampling")
    generation.add_argument("--precision", default="auto", choices=PRECISIONS,
                            help="decoder compute precision (auto: mixed on GPUs, float32 on CPUs)")


def generation_config(args: argparse.Namespace, attention: bool) -> GenerationConfig:
    """The GenerationConfig of generation_options."""
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


def network_options(parser: argparse.ArgumentParser, s3: bool = True) -> None:
    """The address guard, timeouts and (when s3) the S3 endpoint."""
    defaults = FetchConfig()
    network = group(parser, "network")
    network.add_argument("--allow-private-networks", action="store_true",
                         help="let URLs reach private, loopback and link-local addresses (off by default)")
    network.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                         help="let URLs reach this private network only (repeatable), e.g. 127.0.0.1/32")
    network.add_argument("--timeout", type=seconds, default=defaults.read_timeout,
                         help="read timeout per request, seconds")
    network.add_argument("--deadline", type=seconds, default=defaults.deadline,
                         help="total seconds per request, retries and redirects included")
    if s3:
        storage = group(parser, "storage")
        storage.add_argument("--s3-endpoint", default=None,
                             help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL, else AWS itself)")
        storage.add_argument("--storage-retry-window", type=seconds, default=StorageConfig().retry_window,
                             metavar="SECONDS", help="how long each storage operation rides out an outage, "
                             "throttling or 5xx answers (backoff with jitter) before the run stops with one error")


def fetch_config(args: argparse.Namespace) -> FetchConfig:
    """The FetchConfig of network_options."""
    return FetchConfig(read_timeout=args.timeout, deadline=args.deadline,
                       allow_private_networks=args.allow_private_networks, allowed_networks=tuple(args.allow_network))


def storage_config(args: argparse.Namespace) -> StorageConfig:
    """The StorageConfig of network_options."""
    defaults = StorageConfig()
    return StorageConfig(s3_endpoint=getattr(args, "s3_endpoint", None),
                         retry_window=getattr(args, "storage_retry_window", defaults.retry_window))


ADDRESS_HELP = ("Ray cluster to run on: HOST:PORT of its GCS, or `auto` for the cluster started on this machine "
                "(default: the cluster of a submitted job, else a fresh local Ray in this process)")


def ray_options(parser: argparse.ArgumentParser) -> None:
    """Where a Ray job runs, and its progress."""
    ray = group(parser, "Ray")
    ray.add_argument("--address", default=None, help=ADDRESS_HELP)
    ray.add_argument("--connect-timeout", type=seconds, default=CONNECT_TIMEOUT,
                     help="seconds to reach --address before giving up with an error")
    group(parser, "output").add_argument(
        "--no-progress", action="store_true",
        help="no progress (default: bars on a terminal, a plain line every 10 s or 10%% in a log file)")


def sharded_options(parser: argparse.ArgumentParser, stage: str, what: str) -> None:
    """What the bulk and features jobs share: shards, the model stage's actor pool, what a fetch task may read
    and decode. stage: what the actors are ("captioning", "backbone"); what: how local rows are treated."""
    data = group(parser, "data")
    data.add_argument("--shard-size", type=positive, default=defaults.SHARD_SIZE, help="rows per committed shard")
    ray = group(parser, "Ray")
    ray.add_argument("--actors", type=positive, default=defaults.ACTORS,
                     help=f"{stage} actors (each loads its model once)")
    ray.add_argument("--num-gpus", type=non_negative, default=defaults.NUM_GPUS, help=f"GPUs per {stage} actor")
    ray.add_argument("--actor-cpus", type=non_negative, default=defaults.ACTOR_CPUS,
                     help=f"CPUs Ray reserves per {stage} actor")
    fetch_limits(parser, what)


def sharded_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of sharded_options (and the manifest, network and storage options they go with)."""
    return {"spec": manifest_spec(args), "shard_size": args.shard_size, "actors": args.actors,
            "num_gpus": args.num_gpus, "actor_cpus": args.actor_cpus, "fetch_threads": args.fetch_threads,
            "allow_local_files": args.allow_local_files, "allow_s3_sources": args.allow_s3_sources,
            "decode_memory": args.decode_memory * MIB, "image": bulk_image(args.max_pixels),
            "fetch": fetch_config(args), "storage": storage_config(args)}


def fetch_limits(parser: argparse.ArgumentParser, what: str) -> None:
    """What a fetch task may read and decode: the bulk and features jobs' shared limits."""
    fetch = group(parser, "fetching")
    fetch.add_argument("--fetch-threads", type=positive, default=defaults.FETCH_THREADS,
                       help="concurrent requests per fetch task")
    fetch.add_argument("--allow-local-files", action="store_true",
                       help="also read rows that are local paths or file:// URIs" + what)
    fetch.add_argument("--allow-s3-sources", action="store_true",
                       help="also read s3:// rows, with this job's credentials" + what)
    fetch.add_argument("--max-pixels", type=positive, default=BULK_IMAGE.max_pixels,
                       help="refuse images with more pixels than this")
    fetch.add_argument("--decode-memory", type=positive, default=defaults.DECODE_MEMORY // MIB, metavar="MIB",
                       help="decoded-image memory one fetch task may hold at once, MiB")


# The Ray jobs' option sets -----------------------------------------------------------------------------------

def batch_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning batch` / `python -m jobs.batch`."""
    data = group(parser, "data")
    data.add_argument("--manifest", required=True, help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    data.add_argument("--model", required=True, help="model bundle directory or s3:// prefix, or "
                      "registry+URI[@vNNNN]: the registry's current version (resolved once, kept in every row)")
    data.add_argument("--output", required=True, help="output directory or s3:// prefix")
    manifest_options(parser, image="url", caption_help="reference caption, kept in the output")
    sharded_options(parser, "captioning", " (off: a URL job reads no local file)")
    data.add_argument("--no-attention", action="store_true", help="skip attention maps")
    data.add_argument("--attention-png", type=int, default=0, metavar="N",
                      help="also write overlay PNGs for the first N manifest rows")
    data.add_argument("--retry-failed", action="store_true", help="redo only rows with transient failures")
    ray = group(parser, "Ray")
    ray.add_argument("--inference-threads", type=positive, default=None,
                     help="TensorFlow threads per captioning actor (default: all CPUs of its node)")
    ray_options(parser)
    generation_options(parser)
    network_options(parser)


def bulk_config(args: argparse.Namespace) -> Any:
    """The BulkConfig of batch_options."""
    from captioning.bulk import BulkConfig  # noqa: PLC0415

    return BulkConfig(
        manifest=args.manifest, model=args.model, output=args.output, **sharded_config(args),
        batch_size=args.batch_size, inference_threads=args.inference_threads, attention=not args.no_attention,
        attention_png=args.attention_png, retry_failed=args.retry_failed, precision=args.precision,
        generation=generation_config(args, attention=not args.no_attention))


def backbone_options(parser: argparse.ArgumentParser, seed_alias: bool = False) -> None:
    """Which backbone embeds the images, its weights and the seed of a random one."""
    defaults, model_defaults = TrainConfig(), ModelConfig()
    model = group(parser, "model")
    model.add_argument("--backbone", default=model_defaults.backbone, choices=BACKBONE_NAMES,
                       help="frozen image backbone")
    model.add_argument("--weights", default=defaults.weights,
                       help="backbone weights: imagenet (downloaded by Keras), none (a seeded random backbone, "
                       "for offline tests), or a .weights.h5 file")
    model.add_argument("--backbone-seed", *(["--seed"] if seed_alias else []), dest="backbone_seed", type=int,
                       default=defaults.backbone_seed,
                       help="seed of a --weights none backbone, kept apart from the training seed so that training "
                       "seeds compare on the same features")


def features_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning features` / `python -m jobs.features`."""
    data = group(parser, "data")
    data.add_argument("--manifest", required=True, help="CSV/TSV/JSONL/Parquet or Conceptual Captions TSV (local/S3)")
    data.add_argument("--out", "--output", dest="output", required=True, help="output folder or s3:// prefix")
    manifest_options(parser)
    sharded_options(parser, "backbone", " (a manifest reads images of its own kind anyway: local beside a local "
                    "manifest, s3:// beside one on S3)")
    backbone_options(parser, seed_alias=True)
    model = group(parser, "model")
    model.add_argument("--batch-size", type=positive, default=64, help="images per backbone call")
    ray_options(parser)
    network_options(parser)


def features_config(args: argparse.Namespace) -> Any:
    """The FeaturesConfig of features_options."""
    from captioning.featureset import FeaturesConfig  # noqa: PLC0415

    return FeaturesConfig.reading_own_kind(
        args.manifest, args.output, backbone=args.backbone, weights=args.weights, seed=args.backbone_seed,
        batch_size=args.batch_size, **sharded_config(args))


def train_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning train` / `python -m jobs.train`."""
    data = group(parser, "data")
    data.add_argument("--train", required=True, help="training manifest, or a feature set from `captioning features`")
    data.add_argument("--val", required=True, help="validation manifest or feature set")
    data.add_argument("--out", required=True, help="model folder or s3:// prefix (the same --out resumes a run)")
    training_options(parser)
    group(parser, "training").add_argument(
        "--restart", action="store_true",
        help="discard the run recorded in --out and start over (without it, a rerun with other settings is refused)")


def retrain_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning retrain` / `python -m jobs.retrain`."""
    from jobs.retrain import RetrainConfig  # noqa: PLC0415  (its module parses with these options)

    rule = {f.name: f.default for f in fields(RetrainConfig)}
    data = group(parser, "data")
    data.add_argument("--registry", required=True, help="model registry: folder or s3:// prefix")
    data.add_argument("--data-prefix", required=True,
                      help="folder or s3:// prefix of training manifests; those no version has seen are used")
    data.add_argument("--holdout", required=True, help="fixed holdout manifest: the promotion decision's data")
    data.add_argument("--val", required=True, help="fixed validation manifest (early stopping); not the holdout")
    promotion = group(parser, "promotion")
    promotion.add_argument("--tolerance", type=drop, default=rule["tolerance"],
                           help="largest relative drop of holdout BLEU-4 or CIDEr that still promotes, in [0, 1)")
    promotion.add_argument("--min-holdout-rows", type=positive, default=rule["min_rows"],
                           help="scorable rows (captions and an image) the holdout and --val must each hold; checked "
                                "before a version is claimed")
    promotion.add_argument("--min-scored-share", type=share, default=rule["min_scored_share"],
                           help="share of the holdout's rows that the candidate and its parent must both have "
                                "scored for a promotion (1: every image)")
    training_options(parser)


def training_options(parser: argparse.ArgumentParser) -> None:
    """Manifest columns, model and training settings, Ray Train scaling: shared by train and retrain."""
    manifest_options(parser)
    defaults, model_defaults, scaling = TrainConfig(), ModelConfig(), Scaling()
    data = group(parser, "data")
    data.add_argument("--cache-dir", default=None, help="where features of manifests go (default: <out>/features)")
    backbone_options(parser)
    model = group(parser, "model")
    model.add_argument("--vocab-size", type=positive, default=model_defaults.vocab_size,
                       help="most frequent training words kept; the rest are [UNK], which is never scored nor "
                       "generated")
    model.add_argument("--max-length", type=positive, default=model_defaults.max_length,
                       help="tokens per caption, [START] and [END] included (longer captions are cut)")
    model.add_argument("--d-model", type=positive, default=model_defaults.d_model, help="decoder width")
    model.add_argument("--layers", type=positive, default=model_defaults.num_layers, help="decoder layers")
    model.add_argument("--heads", type=positive, default=model_defaults.num_heads,
                       help="attention heads (must divide --d-model)")
    model.add_argument("--dropout", type=float, default=model_defaults.dropout, help="decoder dropout rate")
    model.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="decoder compute precision (auto: mixed on GPUs, float16 with loss scaling; float32 on "
                       "CPUs)")
    training = group(parser, "training")
    training.add_argument("--epochs", type=positive, default=defaults.epochs,
                          help="most epochs; a rerun with a larger value continues the run")
    training.add_argument("--batch-size", type=positive, default=defaults.batch_size,
                          help="global batch: caption pairs per step over all workers")
    training.add_argument("--learning-rate", type=seconds, default=defaults.learning_rate,
                          help="Adam learning rate, not scaled with the worker count")
    training.add_argument("--patience", type=positive, default=defaults.patience,
                          help="epochs without a lower validation loss before early stopping (the best epoch's "
                          "weights are kept)")
    training.add_argument("--steps-per-epoch", type=positive, default=None,
                          help="cap on steps per epoch, for quick runs (default: the whole training set)")
    training.add_argument("--max-seconds", type=seconds, default=None,
                          help="stop after the epoch that uses up this many seconds (default: no limit)")
    training.add_argument("--seed", type=int, default=defaults.seed,
                          help="training seed: initial decoder weights, dropout, shuffling")
    training.add_argument("--shuffle-buffer", type=positive, default=defaults.shuffle_buffer,
                          help="caption pairs mixed per worker (about 56 KiB each)")
    training.add_argument("--checkpoint-every", type=positive, default=None, metavar="STEPS",
                          help="also checkpoint every this many steps (default: at each epoch end only)")
    ray = group(parser, "Ray")
    ray.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: train in this process)")
    ray.add_argument("--gpus-per-worker", type=non_negative, default=scaling.gpus_per_worker,
                     help="GPUs per Ray Train worker (one worker per GPU is the usual choice)")
    ray.add_argument("--cpus-per-worker", type=non_negative, default=scaling.cpus_per_worker,
                     help="CPUs Ray reserves per Ray Train worker")
    ray.add_argument("--max-failures", type=int, default=scaling.max_failures,
                     help="worker failures a Ray run recovers from, each from its last checkpoint")
    ray.add_argument("--keep-checkpoints", type=positive, default=scaling.keep_checkpoints,
                     help="Ray checkpoints kept, the lowest val_loss first")
    ray_options(parser)
    network_options(parser)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of train_options."""
    if args.d_model % args.heads:
        raise CaptioningError("--d-model", f"{args.d_model} is not divisible by --heads {args.heads}")
    model = ModelConfig(vocab_size=args.vocab_size, max_length=args.max_length, d_model=args.d_model,
                        num_layers=args.layers, num_heads=args.heads, dropout=args.dropout, backbone=args.backbone)
    return TrainConfig(model=model, weights=args.weights, epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, patience=args.patience, seed=args.seed,
                       backbone_seed=args.backbone_seed,
                       shuffle_buffer=args.shuffle_buffer, checkpoint_every=args.checkpoint_every,
                       precision=args.precision, max_seconds=args.max_seconds, cache_dir=args.cache_dir,
                       steps_per_epoch=args.steps_per_epoch, fetch=fetch_config(args), storage=storage_config(args))


def scaling(args: argparse.Namespace) -> Scaling:
    """The Scaling of train_options (workers 0: this process)."""
    if args.workers < 0:
        raise CaptioningError("--workers", f"expected 0 (this process) or more, got {args.workers}")
    return Scaling(args.workers, args.gpus_per_worker, args.cpus_per_worker, args.max_failures, args.keep_checkpoints)


class Parser(argparse.ArgumentParser):
    """argparse with one `error:` line for a bad command line (the usage is a --help away), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {printable(redact_text(message))} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def job_parser(prog: str, description: str, options: Callable[[argparse.ArgumentParser], None]) \
        -> argparse.ArgumentParser:
    """The parser of a job entrypoint (`python -m jobs.NAME`): the local command's very options."""
    parser = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    options(parser)
    console_options(parser)
    return parser
