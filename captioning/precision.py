"""Which numeric precision the decoder computes in: mixed on GPUs, float32 on CPUs, or as asked."""

from __future__ import annotations

import tensorflow as tf

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def resolve_precision(precision: str = "auto") -> str:
    """A Keras dtype policy name; "auto" picks bfloat16 on Ampere+ GPUs, float16 on older ones, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        # CPUs gain little from half precision and some lack fast bf16 kernels; keep full precision.
        return "float32"
    major, _ = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    return "mixed_bfloat16" if major >= 8 else "mixed_float16"
