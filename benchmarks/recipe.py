"""The peer: the pipeline a user writes from Ray Data's batch-inference documentation, on the project's model.

read_csv -> map (download and decode each URL) -> map_batches (a predictor class on an actor pool) ->
write_parquet. No commits, no per-row statuses (one bad URL fails the run), no attention maps: what the
docs teach, with nothing of the job's machinery, so that the benchmark can say what that machinery costs.
"""

from __future__ import annotations

import io
import time
import urllib.request
from typing import Any

import numpy as np

SIZE = 224


def download(row: dict[str, Any]) -> dict[str, Any]:
    """Fetch one URL and decode it to the model's input (the docs' `map` stage)."""
    from PIL import Image  # noqa: PLC0415

    with urllib.request.urlopen(row["url"], timeout=30) as response:
        data = response.read()
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE))
    return {"url": row["url"], "image": np.asarray(image)}


class Predictor:
    """The docs' predictor class: the model loaded once per actor, called on batches of images."""

    def __init__(self, model: str) -> None:
        from captioning.bundle import load_bundle  # noqa: PLC0415
        from captioning.generate import Generator  # noqa: PLC0415

        self.bundle = load_bundle(model)
        self.generator = Generator(self.bundle.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.generator(self.bundle.backbone(batch["image"]))
        return {"url": batch["url"], "caption": np.array(out.captions), "score": out.scores}


def run_recipe(manifest: str, model: str, output: str, endpoint: str, batch_size: int = 32,
               actors: int = 1) -> float:
    """The recipe end to end, into S3-compatible storage at endpoint; returns its wall seconds."""
    import sys  # noqa: PLC0415

    import pyarrow.fs  # noqa: PLC0415
    import ray  # noqa: PLC0415

    # The benchmarks folder is no package the workers can import: ship this module's code with the tasks.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    start = time.perf_counter()
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http")
    ds = ray.data.read_csv(manifest)
    ds = ds.map(download)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model": model}, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    ds.write_parquet(output.removeprefix("s3://"), filesystem=filesystem)
    return time.perf_counter() - start
