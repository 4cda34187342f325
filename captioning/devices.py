"""What the hardware is, and the defaults that follow from it: decoder precision, batch size, CPU threads."""

from __future__ import annotations

import math
import os

import tensorflow as tf

from captioning.config import PRECISIONS
# Measured on 2 x86 cores (benchmarks/bulk.py prints the sweep): MobileNetV3Small runs 3.0 ms/image at
# batch 32 but 5.6 ms/image at batch 128, because bigger batches fall out of cache. GPUs want big batches.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256


def has_gpu() -> bool:
    """True when TensorFlow sees at least one GPU."""
    return gpu_capability() is not None


def gpu_capability() -> tuple[int, int] | None:
    """The first GPU's CUDA compute capability ((0, 0) if unknown), or None without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tuple(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)))


def resolve_precision(precision: str = "auto") -> str:
    """A Keras dtype policy name; "auto" picks bfloat16 on Ampere+ GPUs, float16 on older ones, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    capability = gpu_capability()
    if capability is None:
        # CPUs gain little from half precision and some lack fast bf16 kernels; keep full precision.
        return "float32"
    return "mixed_bfloat16" if capability[0] >= 8 else "mixed_float16"


def resolve_batch_size(batch_size: int | None) -> int:
    """Images per backbone/generator call: as asked, or the measured-fastest size for this device."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        return batch_size
    return GPU_BATCH_SIZE if has_gpu() else CPU_BATCH_SIZE


def use_cpu_threads(threads: int | None, reserved: float = 0.0) -> int:
    """Set TensorFlow's op threads (before any op runs): as asked, else the CPUs reserved for this process
    (rounded up), else every CPU it may run on.

    An actor that spreads its ops over every core of a shared node takes them from the fetch and write tasks
    beside it, and its threads then spin waiting for each other: on 2 cores, one actor with 1 thread captioned
    149.6 and 151.0 images/s steady against 141.8 and 138.0 with 2 (benchmarks/bulk.py, 2026-12-03), at 7.4-7.9
    core-ms per image against 9.1-9.4.
    """
    threads = threads or (math.ceil(reserved) if reserved > 0 else len(os.sched_getaffinity(0)))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already ran ops in this process (a stage used in-process): keep its pool
        return tf.config.threading.get_intra_op_parallelism_threads()
    return threads
