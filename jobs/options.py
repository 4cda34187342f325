"""Command-line options and the configs they build: one definition per option set, shared by the `captioning`
command and the job entrypoints (`python -m jobs.batch ...`), so a submitted job parses exactly like the local
command. Argparse only; nothing here imports TensorFlow or Ray.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, fields
import re
import sys
from typing import Any, Callable

from captioning.config import (BACKBONE_CHANNELS, BULK_IMAGE, PRECISIONS, FetchConfig, GenerationConfig, ModelConfig,
                               Option, PolitenessConfig, Scaling, StorageConfig, TrainConfig, bulk_image)
from jobs.ray_setup import CONNECT_TIMEOUT
from captioning import console
from captioning.errors import CaptioningError, captioning_cause
from captioning.redaction import printable, redact_text

BACKBONE_NAMES = list(BACKBONE_CHANNELS)


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


TYPES: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float, "positive": positive,
                                         "non_negative": non_negative, "seconds": seconds, "drop": drop,
                                         "share": share, "count": non_negative_int}


def config_options(parser: argparse.ArgumentParser, config: type, only: tuple[str, ...] | None = None,
                   skip: tuple[str, ...] = ()) -> None:
    """The command-line options of a config dataclass, from its fields' Option metadata (captioning.config), each
    in its group, in field order: a field's flag, help and default have one home, the field."""
    for item in fields(config):
        spec: Option | None = item.metadata.get("option")
        if spec is None or item.name in skip or (only is not None and item.name not in only):
            continue
        how: dict[str, Any] = {"dest": item.name, "help": spec.help}
        # Shown as the flag says it (--layers LAYERS), not as the field is named (NUM_LAYERS).
        metavar = spec.metavar or (None if spec.choices else spec.flags[0].lstrip("-").replace("-", "_").upper())
        if spec.kind == "flag":
            how["action"] = "store_true"
        elif spec.kind == "append":
            how.update(action="append", default=[], metavar=metavar)
        else:
            how.update(type=TYPES[spec.kind], metavar=metavar, choices=spec.choices)
            default = spec.default if spec.own_default else item.default
            if default is MISSING:
                how["required"] = True
            else:
                how["default"] = default // spec.unit if spec.unit != 1 and default is not None else default
        group(parser, spec.group).add_argument(*spec.flags, **how)


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of a config dataclass that its options set, from parsed args (negated switches flipped, units
    applied, repeatable options as tuples)."""
    values: dict[str, Any] = {}
    for item in fields(config):
        spec: Option | None = item.metadata.get("option")
        if spec is None or not hasattr(args, item.name):
            continue
        value = getattr(args, item.name)
        if spec.negated:
            value = not value
        elif spec.kind == "append":
            if not value and item.default is not MISSING:
                continue  # not given: the field's own default
            value = tuple(value)
        elif spec.unit != 1 and value is not None:
            value = value * spec.unit
        values[item.name] = value
    return values


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
    if image != "url":  # image manifests (features, train, retrain, evaluate) may be WebDataset bulk outputs
        data.add_argument("--use-generated", action="store_true",
                          help="a WebDataset bulk output as the manifest: train on its generated captions "
                          "(default: the manifest's reference captions it kept)")


def manifest_spec(args: argparse.Namespace) -> Any:
    """The ManifestSpec of manifest_options."""
    from captioning.manifest import ManifestSpec  # noqa: PLC0415

    return ManifestSpec(args.format, args.image_column, args.caption_column, args.id_column,
                        getattr(args, "use_generated", False))


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
    """The address guard, timeouts and (when s3) the S3 endpoint and retry window."""
    config_options(parser, FetchConfig)
    if s3:
        config_options(parser, StorageConfig)


def fetch_config(args: argparse.Namespace) -> FetchConfig:
    """The FetchConfig of network_options."""
    return FetchConfig(**config_values(args, FetchConfig))


def storage_config(args: argparse.Namespace) -> StorageConfig:
    """The StorageConfig of network_options (its defaults where a command has no storage options)."""
    return StorageConfig(**config_values(args, StorageConfig))


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


def sharded_options(parser: argparse.ArgumentParser, config: type) -> None:
    """What the bulk and features jobs share (ShardedConfig's fields, config's own), and the pixel limit."""
    config_options(parser, config, skip=("manifest", "model", "output"))
    config_options(parser, PolitenessConfig)
    group(parser, "fetching").add_argument("--max-pixels", type=positive, default=BULK_IMAGE.max_pixels,
                                           help="refuse images with more pixels than this")


def sharded_config(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of a sharded job's config: its options', the manifest's, the image limits, network and storage."""
    return {**config_values(args, config), "spec": manifest_spec(args), "image": bulk_image(args.max_pixels),
            "fetch": fetch_config(args), "storage": storage_config(args),
            "politeness": politeness_config(args)}


def politeness_config(args: argparse.Namespace) -> PolitenessConfig:
    """The PolitenessConfig of a command's politeness options."""
    return PolitenessConfig(**config_values(args, PolitenessConfig))


# The Ray jobs' option sets -----------------------------------------------------------------------------------

def batch_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning batch` / `python -m jobs.batch`."""
    from captioning.bulk_config import BulkConfig  # noqa: PLC0415

    config_options(parser, BulkConfig, only=("manifest", "model", "output"))
    manifest_options(parser, image="url", caption_help="reference caption, kept in the output")
    sharded_options(parser, BulkConfig)
    ray_options(parser)
    generation_options(parser)
    network_options(parser)


def bulk_config(args: argparse.Namespace) -> Any:
    """The BulkConfig of batch_options."""
    from captioning.bulk_config import BulkConfig  # noqa: PLC0415

    values = sharded_config(args, BulkConfig)
    if values.get("keep_original") and values.get("output_format") != "webdataset":
        from captioning.errors import CaptioningError  # noqa: PLC0415

        raise CaptioningError("--keep-original", "keeps images only in --output-format webdataset")
    return BulkConfig(**values, batch_size=args.batch_size, precision=args.precision,
                      generation=generation_config(args, attention=values["attention"]))


def features_options(parser: argparse.ArgumentParser) -> None:
    """Options of `captioning features` / `python -m jobs.features`."""
    from captioning.featureset_config import FeaturesConfig  # noqa: PLC0415

    config_options(parser, FeaturesConfig, only=("manifest", "output"))
    manifest_options(parser)
    sharded_options(parser, FeaturesConfig)
    ray_options(parser)
    network_options(parser)


def features_config(args: argparse.Namespace) -> Any:
    """The FeaturesConfig of features_options."""
    from captioning.featureset_config import FeaturesConfig  # noqa: PLC0415

    values = sharded_config(args, FeaturesConfig)
    return FeaturesConfig.reading_own_kind(values.pop("manifest"), values.pop("output"), **values)


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

    config_options(parser, RetrainConfig)
    training_options(parser)


def training_options(parser: argparse.ArgumentParser) -> None:
    """Manifest columns, model and training settings, Ray Train scaling: shared by train and retrain."""
    manifest_options(parser)
    config_options(parser, TrainConfig, only=("cache_dir",))
    config_options(parser, ModelConfig)
    config_options(parser, TrainConfig, skip=("cache_dir",))
    config_options(parser, Scaling)
    ray_options(parser)
    network_options(parser)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of train_options."""
    if args.d_model % args.num_heads:
        raise CaptioningError("--d-model", f"{args.d_model} is not divisible by --heads {args.num_heads}")
    return TrainConfig(**config_values(args, TrainConfig), model=ModelConfig(**config_values(args, ModelConfig)),
                       fetch=fetch_config(args), storage=storage_config(args))


def scaling(args: argparse.Namespace) -> Scaling:
    """The Scaling of train_options (workers 0: this process)."""
    if args.workers < 0:
        raise CaptioningError("--workers", f"expected 0 (this process) or more, got {args.workers}")
    return Scaling(**config_values(args, Scaling))


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
