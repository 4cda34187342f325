"""Bytes to model input: decode, orient, convert to RGB, resize; refuses decompression bombs."""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from captioning.config import ImageConfig
from captioning.errors import CaptioningError, ImageError
from captioning.fetch import Fetcher, is_url
from captioning.output_source import TARS, is_member
from captioning.storage import Storage


def read_source(source: str, fetcher: Fetcher | None, storage: Storage | None = None,
                max_bytes: int | None = None) -> bytes:
    """Bytes of a local file, an s3:// object or an http(s) URL; raises CaptioningError naming the source.

    max_bytes caps local and S3 reads (checked from the size before reading); URLs use the fetcher's cap.
    """
    if is_member(source):  # an image a WebDataset bulk output kept (captioning/output_source.py)
        return TARS.member(source, storage or Storage(), max_bytes)
    if is_url(source):
        if fetcher is None:
            raise CaptioningError(source, "URLs need a fetcher (network access was not configured)")
        return fetcher.get(source).data
    return (storage or Storage()).read_bytes(source, max_bytes)


def load_image(
    source: str, config: ImageConfig, fetcher: Fetcher | None = None, storage: Storage | None = None
) -> np.ndarray:
    """A path, s3:// object or URL as a model-ready uint8 image (size, size, 3)."""
    return decode_image(read_source(source, fetcher, storage), source, config)


def decode_image(data: bytes, source: str, config: ImageConfig) -> np.ndarray:
    """Image bytes -> uint8 array (size, size, 3); raises ImageError naming source."""
    return decode_with_size(data, source, config)[0]


class DecodeBudget:
    """Bytes of decoded pixels that may be in memory at once across threads; a decode waits for its share.

    Small files can decode to huge images, so the threads of one fetch task share this bound.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_use = 0
        self._free = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold cost bytes while decoding; one decode alone may always run, whatever its cost."""
        with self._free:
            self._free.wait_for(lambda: self.in_use == 0 or self.in_use + cost <= self.max_bytes)
            self.in_use += cost
        try:
            yield
        finally:
            with self._free:
                self.in_use -= cost
                self._free.notify_all()


def decode_cost(image: Image.Image) -> int:
    """Bytes a full decode of image needs: its pixels as Pillow stores them, plus the RGB copy we make."""
    width, height = image.size
    if image.mode in ("1", "L", "P"):
        stored = 1
    elif image.mode.startswith("I;16"):
        stored = 2
    else:
        stored = 4  # I, F, and every multi-band mode (Pillow keeps RGB as 4 bytes a pixel)
    return width * height * (stored + (0 if image.mode == "RGB" else 4))


# EXIF orientation -> the Pillow transpose that makes the image upright (as ImageOps.exif_transpose does).
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
EXIF_ORIENTATION = 0x0112


def decode_with_size(data: bytes, source: str, config: ImageConfig,
                     budget: DecodeBudget | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 array (size, size, 3), (width, height) as stored, before orientation or draft)."""
    with _decode_errors(source):
        image = _checked(data, source, config, draft=True)
        with _reserved(budget, decode_cost(image)):
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                rgb = _turbo_jpeg(data, image)
            else:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                rgb = to_rgb(image)
            rgb = rgb.resize((config.size, config.size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), image.info["stored_size"]


def _turbo_jpeg(data: bytes, header: Image.Image) -> Image.Image:
    """A YCbCr or greyscale JPEG decoded by libjpeg-turbo outside the GIL, upright, as RGB.

    The DCT-domain scale is the one Pillow's draft() chose for header, so that the pixels are the ones the Pillow
    path gives (training decodes through here too: no skew between the features trained on and served).
    CMYK/YCCK JPEGs (Adobe's inverted CMYK) stay with Pillow.
    """
    width, height = header.info["stored_size"]
    scale = max(1, round(width / header.size[0]))  # draft() made the size ceil(stored / scale), scale in 1, 2, 4, 8
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale, min_width=-(-width // scale),
                                    min_height=-(-height // scale))
    image = Image.fromarray(pixels, "RGB")
    orientation = header.getexif().get(EXIF_ORIENTATION)
    return image.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else image


def open_image(data: bytes, source: str, config: ImageConfig, draft: bool = False) -> Image.Image:
    """Fully decoded, upright Pillow image; format, pixel and memory limits are checked from the header first."""
    with _decode_errors(source):
        image = _checked(data, source, config, draft)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place keeps .format, which callers use
        return image


def _checked(data: bytes, source: str, config: ImageConfig, draft: bool) -> Image.Image:
    """The image with only its header read, refused if its format, size or decode memory is over the limits."""
    with warnings.catch_warnings():
        # Our own pixel limit below replaces Pillow's global one, so its warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Only the formats the job supports: every other Pillow plugin is attack surface nobody asked for.
        image = Image.open(io.BytesIO(data), formats=config.formats)
    width, height = image.size
    image.info["stored_size"] = (width, height)  # draft mode and EXIF rotation change .size
    if width * height > config.max_pixels:
        raise ImageError(source, f"image is {width}x{height}, over the {config.max_pixels} pixel limit", "too_large")
    if draft and image.format in ("JPEG", "MPO"):
        # Draft mode lets libjpeg decode at 1/2..1/8 scale: much faster (and smaller) for big photos.
        image.draft("RGB", (config.size, config.size))
    cost = decode_cost(image)
    if cost > config.max_decode_bytes:
        raise ImageError(source, f"a {width}x{height} {image.mode} image needs {cost >> 20} MiB to decode, over the "
                         f"{config.max_decode_bytes >> 20} MiB limit", "too_large")
    return image


def _reserved(budget: DecodeBudget | None, cost: int) -> ContextManager[None]:
    return budget.reserve(cost) if budget is not None else nullcontext()


@contextmanager
def _decode_errors(source: str) -> Iterator[None]:
    """Pillow's many failure types as one ImageError with a reason code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(source, str(err), "too_large") from None
    except UnidentifiedImageError:
        raise ImageError(source, "not an image in a supported format", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
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


# Magic numbers of the formats the decoder opens, for naming stored bytes (WebDataset: KEY.<extension>).
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number ("bin" if none matches)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """An RGB uint8 (height, width, 3) array as JPEG bytes (libjpeg-turbo, off the GIL)."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB")
