"""Typed configuration objects, built once (by the CLI or a job) and passed down."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

# The frozen backbones (captioning/features.py builds them) and their feature depth C: the names are here so that
# the command line offers them without importing TensorFlow.
BACKBONE_CHANNELS = {"mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "efficientnet_b0": 1280}
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
WEIGHTS_HELP = ("backbone weights: imagenet (downloaded by Keras), none (a seeded random backbone, for offline "
                "tests), or a .weights.h5 file")
BACKBONE_SEED_HELP = ("seed of a --weights none backbone, kept apart from the training seed so that training seeds "
                      "compare on the same features")


@dataclass(frozen=True)
class Option:
    """How a config field is set on the command line. jobs/options.py builds the argparse groups from these, so a
    field's flag, help, group and default live in one place, beside the field (the library itself never parses).
    kind: how the text is read (str, int, float, positive, non_negative, seconds, drop, share; flag: a switch,
    append: repeatable, kept as a tuple)."""

    flags: tuple[str, ...]
    help: str
    group: str
    kind: str = "str"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    unit: int = 1  # the field holds the given value times this (MiB given, bytes kept)
    negated: bool = False  # a --no-X switch for a field that is True unless it is given
    default: Any = None  # the command line's own default, where it differs from the field's (said why there)
    own_default: bool = False  # whether `default` is set


def option(*flags: str, help: str, group: str, default: Any = MISSING, option_default: Any = MISSING,
           kw_only: Any = MISSING, **how: Any) -> Any:
    """A dataclass field that is also a command-line option (no default: a required option)."""
    spec = Option(flags, help, group, **how) if option_default is MISSING else \
        Option(flags, help, group, default=option_default, own_default=True, **how)
    return field(default=default, kw_only=kw_only, metadata={"option": spec})


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the captioner; stored in every model bundle."""

    vocab_size: int = option("--vocab-size", default=5000, kind="positive", group="model",
                             help="most frequent training words kept; the rest are [UNK], which is never scored nor "
                             "generated")
    max_length: int = option("--max-length", default=32, kind="positive", group="model",
                             help="tokens per caption, [START] and [END] included (longer captions are cut)")
    d_model: int = option("--d-model", default=256, kind="positive", group="model", help="decoder width")
    num_layers: int = option("--layers", default=2, kind="positive", group="model", help="decoder layers")
    num_heads: int = option("--heads", default=2, kind="positive", group="model",
                            help="attention heads (must divide --d-model)")
    ff_multiplier: int = 2
    dropout: float = option("--dropout", default=0.3, kind="float", group="model", help="decoder dropout rate")
    backbone: str = option("--backbone", default="mobilenet_v3_small", choices=tuple(BACKBONE_CHANNELS),
                           group="model", help="frozen image backbone")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error so a bad bundle is caught early."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


OPT_OUT_TOKENS = ("noai", "noimageai", "tdm-reservation")


@dataclass(frozen=True)
class FetchConfig:
    """How URLs are fetched: timeouts, retries, limits and the private-address guard."""

    connect_timeout: float = 5.0
    read_timeout: float = option("--timeout", default=15.0, kind="seconds", group="network",
                                 help="read timeout per request, seconds")  # a silent server
    deadline: float = option("--deadline", default=60.0, kind="seconds", group="network",
                             help="total seconds per request, retries and redirects included")  # a server that drips
    min_rate: float = 1024.0  # bytes/s a response must average once min_rate_after seconds have passed
    min_rate_after: float = 10.0
    retries: int = 3
    backoff: float = 0.5  # seconds, doubled per retry
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = "captioning/0.1 (+https://github.com/captioning/captioning; batch image captioner)"
    allow_private_networks: bool = option("--allow-private-networks", default=False, kind="flag", group="network",
                                          help="let URLs reach private, loopback and link-local addresses (off by "
                                          "default)")
    allowed_networks: tuple[str, ...] = option("--allow-network", default=(), kind="append", metavar="CIDR",
                                               group="network", help="let URLs reach this private network only "
                                               "(repeatable), e.g. 127.0.0.1/32")
    respect_robots_header: bool = True
    opt_out_tokens: tuple[str, ...] = option(
        "--opt-out-token", default=OPT_OUT_TOKENS, kind="append", metavar="TOKEN",
        group="network", help="an opt-out a response's headers may carry that stops its body from being read "
        f"(repeatable; default: {', '.join(OPT_OUT_TOKENS)}): X-Robots-Tag tokens, or tdm-reservation (TDMRep's "
        "`tdm-reservation: 1`); `none` honours none")


@dataclass(frozen=True)
class PolitenessConfig:
    """What a sharded job owes the hosts it fetches from, held for the whole job (every task and node together)."""

    per_host_concurrency: int = option(
        "--per-host-concurrency", default=4, kind="count", metavar="N", group="politeness",
        help="requests in flight to one host at once, across the whole job (0: no limit)")
    per_host_rate: float | None = option(
        "--per-host-rate", default=None, kind="seconds", metavar="R", group="politeness",
        help="requests per second to one host, across the whole job (default: no rate limit)")
    ignore_robots_txt: bool = option(
        "--ignore-robots-txt", default=False, kind="flag", group="politeness",
        help="do not fetch or honour hosts' robots.txt (default: fetched once per host per job and honoured for "
        "this tool's user agent and *; rows it forbids are robots_disallowed, never requested)")
    breaker_failures: int = option(
        "--host-failures", default=5, kind="count", metavar="N", group="politeness",
        help="failures in a row (connection, timeout, 5xx) after which a host gets no more requests in this job: "
        "its rows are host_unavailable, which --retry-failed retries (0: never give up on a host)")
    max_retry_after: float = 120.0  # seconds of Retry-After waited for; longer, and the rows are throttled (transient)
    slow_after: int = 3  # 429/503 answers in a row after which a host's limits are halved for the rest of the job
    systemic_window: int = 24  # request outcomes a fetch task judges "our side is failing" on
    systemic_share: float = 0.8  # ... the share of them failing with one our-side cause, over >= 3 hosts
    systemic_pause: float = 30.0  # seconds fetching pauses when that happens, doubled on each repeat
    systemic_retries: int = 2  # pauses before the rows are given up as systemic_failure (transient)
    ledger_shards: int = 0  # host-ledger actors (0: one per 32 fetch tasks)

    @property
    def active(self) -> bool:
        """Whether a job needs the host ledger at all."""
        return bool(self.per_host_concurrency or self.per_host_rate or not self.ignore_robots_txt
                    or self.breaker_failures)


@dataclass(frozen=True)
class ImageConfig:
    """How bytes become model input."""

    size: int = 224
    max_pixels: int = 64_000_000  # decompression-bomb limit, checked from the header before decoding
    max_decode_bytes: int = 512 * 1024 * 1024  # memory one decode may take (pixels x bytes per pixel)
    formats: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # Pillow plugins tried (JPEG covers MPO)


DECODE_BYTES_PER_PIXEL = 8  # decode memory allowed per pixel of a bulk job's pixel limit


def bulk_image(max_pixels: int = 25_000_000) -> ImageConfig:
    """The image rules of bulk decodes: a lower pixel limit than single images get, since many fetch threads
    decode at once, and the decode memory that limit implies."""
    return ImageConfig(max_pixels=max_pixels, max_decode_bytes=max_pixels * DECODE_BYTES_PER_PIXEL)


BULK_IMAGE = bulk_image()


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage settings; anything unset comes from the standard AWS environment and config files."""

    s3_endpoint: str | None = option("--s3-endpoint", default=None, group="storage",  # e.g. SeaweedFS's
                                     help="S3-compatible endpoint for s3:// URIs (default: AWS_ENDPOINT_URL, else "
                                     "AWS itself)")
    region: str | None = None
    path_style: bool | None = None  # None: path-style addressing when an endpoint is given (most S3 clones)
    multipart_threshold: int = 64 * 1024 * 1024
    # Seconds an operation keeps retrying transient trouble (connection refused or reset, timeouts, 5xx,
    # SlowDown) with exponential backoff and jitter before it fails; permanent errors fail at once.
    retry_window: float = option("--storage-retry-window", default=300.0, kind="seconds", metavar="SECONDS",
                                 group="storage", help="how long each storage operation rides out an outage, "
                                 "throttling or 5xx answers (backoff with jitter) before the run stops with one "
                                 "error")
    retry_base: float = 0.5  # first backoff, seconds; doubled per attempt up to retry_cap, times a jitter in [0.5, 1)
    retry_cap: float = 20.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `captioning train` needs besides the manifests."""

    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str = option("--weights", default="imagenet", group="model", help=WEIGHTS_HELP)
    epochs: int = option("--epochs", default=30, kind="positive", group="training",
                         help="most epochs; a rerun with a larger value continues the run")
    batch_size: int = option("--batch-size", default=64, kind="positive", group="training",
                             help="global batch: caption pairs per step over all workers")
    learning_rate: float = option("--learning-rate", default=1e-4, kind="seconds", group="training",
                                  help="Adam learning rate, not scaled with the worker count")
    patience: int = option("--patience", default=5, kind="positive", group="training",
                           help="epochs without a lower validation loss before early stopping (the best epoch's "
                           "weights are kept)")
    seed: int = option("--seed", default=0, kind="int", group="training",
                       help="training seed: initial decoder weights, dropout, shuffling")
    # The --weights none backbone's own seed: other training seeds train on the same features.
    backbone_seed: int = option("--backbone-seed", default=0, kind="int", group="model", help=BACKBONE_SEED_HELP)
    # Each image held holds its 56 KiB of features.
    shuffle_buffer: int = option("--shuffle-buffer", default=2048, kind="positive", group="training",
                                 help="images mixed per worker, about 56 KiB each (caption pairs with "
                                 "--no-group-by-image)")
    xla: str = option("--xla", default="auto", choices=("auto", "on", "off"), group="training",
                      help="compile each replica's train and eval pass with XLA (auto: on GPUs only; on the CPUs "
                      "measured it is slower, see benchmarks/training.py)")
    padding: str = option("--padding", default="bucket", choices=("bucket", "fixed"), group="training",
                          help="bucket: each batch padded to its longest caption, rounded up to 8 tokens; fixed: "
                          "every batch padded to --max-length (the TensorFlow tutorial's way)")
    group_by_image: bool = option("--no-group-by-image", default=True, kind="flag", negated=True, group="training",
                                  help="shuffle caption pairs and project each caption's image on its own, instead "
                                  "of batching whole images and projecting each image once")
    cache_dir: str | None = option("--cache-dir", default=None, group="data",
                                   help="where features of manifests go (default: <out>/features)")
    image: ImageConfig = field(default_factory=ImageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    steps_per_epoch: int | None = option("--steps-per-epoch", default=None, kind="positive", group="training",
                                         help="cap on steps per epoch, for quick runs (default: the whole training "
                                         "set)")
    max_seconds: float | None = option("--max-seconds", default=None, kind="seconds", group="training",
                                       help="stop after the epoch that uses up this many seconds (default: no "
                                       "limit)")
    checkpoint_every: int | None = option("--checkpoint-every", default=None, kind="positive", metavar="STEPS",
                                          group="training", help="also checkpoint every this many steps (default: "
                                          "at each epoch end only)")
    precision: str = option("--precision", default="auto", choices=PRECISIONS, group="model",
                            help="decoder compute precision (auto: mixed on GPUs, float16 with loss scaling; float32 "
                            "on CPUs)")
    sample_every_epoch: bool = True
    # A bundle (folder or s3://) to start from: its backbone embeds the data, its vocabulary is kept (new words
    # become [UNK]) and its decoder weights are the starting point. The model settings must be the bundle's.
    warm_start: str | None = None
    # Beyond the images of a manifest's own kind (local beside a local manifest, s3:// beside one on S3):
    allow_local_files: bool = False
    allow_s3_sources: bool = False


@dataclass(frozen=True)
class Scaling:
    """How many Ray Train workers, what each gets, and how many failures the run survives (0 workers: one
    process, no Ray)."""

    # The command line trains in this process unless told otherwise; a Scaling made in code is for Ray.
    workers: int = option("--workers", default=2, kind="int", group="Ray", option_default=0,
                          help="Ray Train workers (0: train in this process)")
    gpus_per_worker: float = option("--gpus-per-worker", default=0.0, kind="non_negative", group="Ray",
                                    help="GPUs per Ray Train worker (one worker per GPU is the usual choice)")
    cpus_per_worker: float = option("--cpus-per-worker", default=1.0, kind="non_negative", group="Ray",
                                    help="CPUs Ray reserves per Ray Train worker")
    max_failures: int = option("--max-failures", default=2, kind="int", group="Ray",
                               help="worker failures a Ray run recovers from, each from its last checkpoint")
    keep_checkpoints: int = option("--keep-checkpoints", default=2, kind="positive", group="Ray",
                                   help="Ray checkpoints kept, the lowest val_loss first")


METHODS = ("greedy", "sample", "beam")


@dataclass(frozen=True)
class GenerationConfig:
    """How to turn logits into words."""

    method: str = "greedy"
    temperature: float = 1.0  # for "sample"
    beam_size: int = 3  # for "beam"
    top_k: int = 1  # how many beam hypotheses to return per image
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    attention: bool = True
    seed: int = 0
    jit_compile: bool | None = None  # XLA-compile the loop; None: on when a GPU is present

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown generation method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "sample" and self.temperature <= 0:
            raise ValueError("temperature must be positive for sampling")
        if self.method == "beam" and not 1 <= self.top_k <= self.beam_size:
            raise ValueError("top_k must be between 1 and beam_size")
