"""Typed configuration objects, built once (by the CLI or a job) and passed down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The frozen backbones (captioning/features.py builds them) and their feature depth C: the names are here so that
# the command line offers them without importing TensorFlow.
BACKBONE_CHANNELS = {"mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "efficientnet_b0": 1280}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the captioner; stored in every model bundle."""

    vocab_size: int = 5000
    max_length: int = 32  # tokens per caption including [START] and [END]
    d_model: int = 256
    num_layers: int = 2
    num_heads: int = 2
    ff_multiplier: int = 2
    dropout: float = 0.3
    backbone: str = "mobilenet_v3_small"

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


@dataclass(frozen=True)
class FetchConfig:
    """How URLs are fetched: timeouts, retries, limits and the private-address guard."""

    connect_timeout: float = 5.0
    read_timeout: float = 15.0  # per read: a silent server
    deadline: float = 60.0  # per request, retries and redirects included: a server that drips bytes
    min_rate: float = 1024.0  # bytes/s a response must average once min_rate_after seconds have passed
    min_rate_after: float = 10.0
    retries: int = 3
    backoff: float = 0.5  # seconds, doubled per retry
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = "captioning/0.1 (+https://github.com/captioning/captioning; batch image captioner)"
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs let through the guard, e.g. ("127.0.0.1/32",) for a test server
    respect_robots_header: bool = True


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

    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333 for SeaweedFS; AWS_ENDPOINT_URL also works
    region: str | None = None
    path_style: bool | None = None  # None: path-style addressing when an endpoint is given (most S3 clones)
    multipart_threshold: int = 64 * 1024 * 1024
    # Seconds an operation keeps retrying transient trouble (connection refused or reset, timeouts, 5xx,
    # SlowDown) with exponential backoff and jitter before it fails; permanent errors fail at once.
    retry_window: float = 300.0
    retry_base: float = 0.5  # first backoff, seconds; doubled per attempt up to retry_cap, times a jitter in [0.5, 1)
    retry_cap: float = 20.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `captioning train` needs besides the manifests."""

    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str = "imagenet"  # "imagenet", "none" (seeded random backbone) or a local weights file
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-4
    patience: int = 5
    seed: int = 0  # training: initial weights, dropout, shuffling
    backbone_seed: int = 0  # the --weights none backbone's own: other training seeds train on the same features
    shuffle_buffer: int = 2048  # caption pairs mixed per worker; each holds its image's 56 KiB of features
    cache_dir: str | None = None  # where features of manifests are made; default <out>/features
    image: ImageConfig = field(default_factory=ImageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    steps_per_epoch: int | None = None  # cap, for quick runs
    max_seconds: float | None = None  # wall-clock budget for the epochs; checked after each epoch
    checkpoint_every: int | None = None  # also checkpoint every this many steps within an epoch
    precision: str = "auto"  # decoder compute dtype policy; auto: mixed on GPUs (loss-scaled for float16), float32 on CPUs
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

    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    keep_checkpoints: int = 2


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
