import io

import numpy as np
import pytest
from PIL import Image

from captioning.config import ImageConfig
from captioning.errors import CaptioningError, ImageError
from captioning.images import decode_image, decode_with_size, load_image

CONFIG = ImageConfig(size=32)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("I;16", "PNG"), ("RGB", "WEBP"), ("LA", "PNG")])
def test_any_mode_becomes_rgb(mode, fmt):
    image = Image.new("RGB", (40, 30), (200, 50, 50)).convert(mode)
    out = decode_image(encode(image, fmt), "x", CONFIG)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert decode_image(encode(image, "PNG"), "x", CONFIG)[5, 5].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: the red half ends up on top
    out = decode_image(encode(image, "JPEG", exif=exif), "x", ImageConfig(size=60))
    assert out[5, 30, 0] > 200 and out[55, 30, 2] > 200


def test_stored_size_is_reported_before_draft_decoding_and_rotation():
    big = encode(Image.new("RGB", (1000, 800), (10, 20, 30)), "JPEG")  # draft mode decodes it at 1/8
    assert decode_with_size(big, "x", CONFIG)[1] == (1000, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    out, size = decode_with_size(encode(Image.new("RGB", (60, 20)), "JPEG", exif=exif), "x", CONFIG)
    assert size == (60, 20) and out.shape == (32, 32, 3)


def test_not_an_image_truncated_and_too_large_name_the_source():
    with pytest.raises(ImageError, match="page.html: not an image") as err:
        decode_image(b"<html>hello</html>", "page.html", CONFIG)
    assert err.value.reason == "not_an_image"
    jpeg = encode(Image.new("RGB", (200, 200), (9, 9, 9)), "JPEG")
    with pytest.raises(ImageError, match="cut.jpg") as err:
        decode_image(jpeg[: len(jpeg) // 3], "cut.jpg", CONFIG)
    assert err.value.reason == "corrupt_image"
    big = encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(ImageError, match="big.png: image is 300x300") as err:
        decode_image(big, "big.png", ImageConfig(size=32, max_pixels=50_000))
    assert err.value.reason == "too_large"


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # A 20000x20000 PNG of zeros compresses to ~400 KB; decoding it would take 400 MB.
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageError) as err:
        decode_image(bomb, "bomb.png", ImageConfig(size=32, max_pixels=100_000_000))
    assert err.value.reason == "too_large"


def test_load_image_reports_missing_file(tmp_path):
    with pytest.raises(CaptioningError, match="missing.jpg: cannot read: No such file"):
        load_image(str(tmp_path / "missing.jpg"), CONFIG)
