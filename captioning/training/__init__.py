"""Training parts: data (pairs -> tf.data), loop (the custom step and the epoch loop), hooks (per-epoch work)."""
