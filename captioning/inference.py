"""Images in, captions out, with a loaded bundle: decode in threads, backbone, then the Generator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from captioning.bundle import Bundle
from captioning.config import ImageConfig
from captioning.devices import resolve_batch_size
from captioning.errors import CaptioningError
from captioning.fetch import Fetcher
from captioning.generate import GenerationConfig, Generator
from captioning.images import load_image
from captioning.storage import Storage


@dataclass
class Captioned:
    """The outcome for one source: a caption, or the error that stopped it."""

    source: str
    caption: str | None = None
    score: float | None = None
    attention: np.ndarray | None = None  # (words, 7, 7)
    image: np.ndarray | None = None  # kept only when asked for (plots)
    alternatives: list[tuple[str, float]] | None = None
    error: CaptioningError | None = None


def caption_sources(
    bundle: Bundle,
    sources: Sequence[str],
    generation: GenerationConfig,
    image_config: ImageConfig | None = None,
    fetcher: Fetcher | None = None,
    batch_size: int | None = None,
    keep_images: bool = False,
    storage: Storage | None = None,
) -> Iterator[Captioned]:
    """Caption paths/URLs in input order; a bad source yields its error and the rest go on."""
    image_config = image_config or ImageConfig()
    generator = Generator(bundle.model, generation)
    batch_size = resolve_batch_size(batch_size)

    def load(source: str) -> Captioned | tuple[str, np.ndarray]:
        try:
            return source, load_image(source, image_config, fetcher, storage)
        except CaptioningError as err:
            return Captioned(source, error=err)

    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(sources), batch_size):
            loaded = list(pool.map(load, sources[start : start + batch_size]))
            good = [i for i, item in enumerate(loaded) if isinstance(item, tuple)]
            if good:
                out = generator(bundle.backbone(np.stack([loaded[i][1] for i in good])))
                for row, i in enumerate(good):
                    source, image = loaded[i]
                    loaded[i] = Captioned(
                        source, out.captions[row], float(out.scores[row]),
                        out.attention[row] if out.attention is not None else None,
                        image if keep_images else None,
                        out.alternatives[row] if out.alternatives is not None else None,
                    )
            yield from loaded
