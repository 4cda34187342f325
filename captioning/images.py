"""Bytes to model input: decode, orient, convert to RGB, resize; refuses decompression bombs."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioning.config import ImageConfig
from captioning.errors import CaptioningError, ImageError
from captioning.fetch import Fetcher, is_url
from captioning.storage import Storage, is_s3, local_path


def read_source(source: str, fetcher: Fetcher | None, storage: Storage | None = None) -> bytes:
    """Bytes of a local file, an s3:// object or an http(s) URL; raises CaptioningError naming the source."""
    if is_url(source):
        if fetcher is None:
            raise CaptioningError(source, "URLs need a fetcher (network access was not configured)")
        return fetcher.get(source).data
    if is_s3(source):
        return (storage or Storage()).read_bytes(source)
    try:
        return local_path(source).read_bytes()
    except OSError as err:
        raise CaptioningError(source, f"cannot read file: {err.strerror}", "unreadable") from None


def load_image(
    source: str, config: ImageConfig, fetcher: Fetcher | None = None, storage: Storage | None = None
) -> np.ndarray:
    """A path, s3:// object or URL as a model-ready uint8 image (size, size, 3)."""
    return decode_image(read_source(source, fetcher, storage), source, config)


def decode_image(data: bytes, source: str, config: ImageConfig) -> np.ndarray:
    """Image bytes -> uint8 array (size, size, 3); raises ImageError naming source."""
    return decode_with_size(data, source, config)[0]


def decode_with_size(data: bytes, source: str, config: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 array (size, size, 3), (width, height) as stored, before orientation or draft)."""
    image = open_image(data, source, config, draft=True)
    rgb = to_rgb(image).resize((config.size, config.size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), image.info["stored_size"]


def open_image(data: bytes, source: str, config: ImageConfig, draft: bool = False) -> Image.Image:
    """Fully decoded, upright Pillow image; the pixel limit is checked from the header first."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's global one, so its warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            image.info["stored_size"] = (width, height)  # draft mode and EXIF rotation change .size
            if width * height > config.max_pixels:
                raise ImageError(
                    source, f"image is {width}x{height}, over the {config.max_pixels} pixel limit", "too_large"
                )
            if draft and image.format == "JPEG":
                # Draft mode lets libjpeg decode at 1/2..1/8 scale: much faster for big photos.
                image.draft("RGB", (config.size, config.size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place keeps .format, which callers use
            return image
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(source, str(err), "too_large") from None
    except UnidentifiedImageError:
        raise ImageError(source, "not an image (unrecognised format)", "not_an_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated", ...).
        raise ImageError(source, f"cannot decode image: {err}", "corrupt_image") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, ...) as RGB; transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit / float grayscale: scale to 8 bits before converting.
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        image = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
