import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from captioning.config import ImageConfig
from captioning.errors import CaptioningError, ImageError
from captioning import images
from captioning.images import decode_image, decode_with_size, load_image, to_rgb

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


def test_decode_memory_is_counted_per_byte_per_pixel():
    from captioning.images import decode_cost

    rgba = Image.new("RGBA", (100, 50))
    assert decode_cost(Image.open(io.BytesIO(encode(rgba, "PNG")))) == 100 * 50 * (4 + 4)  # RGBA + RGB copy
    assert decode_cost(Image.open(io.BytesIO(encode(Image.new("L", (100, 50)), "PNG")))) == 100 * 50 * (1 + 4)
    tight = ImageConfig(size=32, max_pixels=10**8, max_decode_bytes=30_000)
    with pytest.raises(ImageError, match="needs 0 MiB to decode") as err:  # 40,000 bytes, under the pixel limit
        decode_image(encode(rgba, "PNG"), "rgba.png", tight)
    assert err.value.reason == "too_large"
    assert decode_image(encode(Image.new("L", (50, 50)), "PNG"), "small.png", tight).shape == (32, 32, 3)


def test_only_supported_formats_are_opened():
    ico = encode(Image.new("RGB", (32, 32)), "ICO")  # Pillow could open it; the job does not want to
    with pytest.raises(ImageError) as err:
        decode_image(ico, "x.ico", CONFIG)
    assert err.value.reason == "not_an_image"
    assert decode_image(ico, "x.ico", ImageConfig(size=32, formats=("ICO",))).shape == (32, 32, 3)


def test_decode_budget_bounds_the_bytes_in_flight():
    import threading
    import time

    from captioning.images import DecodeBudget

    budget, seen, lock = DecodeBudget(100), [], threading.Lock()

    def decode(cost):
        with budget.reserve(cost):
            with lock:
                seen.append(budget.in_use)
            time.sleep(0.05)

    threads = [threading.Thread(target=decode, args=(60,)) for _ in range(4)]
    threads.append(threading.Thread(target=decode, args=(500,)))  # over the budget alone: runs, but alone
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads) and budget.in_use == 0 and len(seen) == 5
    # Never two 60s at once (120 > 100), and the oversized one only ever alone.
    assert all(level in (60, 500) for level in seen), seen


def pillow_reference(data: bytes, size: int) -> np.ndarray:
    """What Pillow alone gives for the same bytes: draft, decode, upright, RGB, bilinear resize."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))
    image.load()
    image = ImageOps.exif_transpose(image)
    return np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth picture with edges (JPEG's kind of content), different in every quadrant so rotations show."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    rgb[: height // 3, : width // 4] = (250, 20, 20)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").convert(mode)


@pytest.mark.parametrize("case", ["plain", "exif-rotated", "cmyk", "greyscale", "draft-scaled", "odd-size-draft"])
def test_turbo_decode_gives_pillows_pixels(case):
    exif = Image.Exif()
    if case == "exif-rotated":
        exif[0x0112] = 6
    size, (width, height), mode = 96, (160, 120), "RGB"
    if case == "cmyk":
        mode = "CMYK"
    elif case == "greyscale":
        mode = "L"
    elif case == "draft-scaled":
        width, height = 800, 600  # Pillow's draft decodes at 1/2 scale; the turbo path must pick the same
    elif case == "odd-size-draft":
        width, height = 1601, 811  # ceil sizes at 1/8 scale
    data = encode(photo(width, height, mode), "JPEG", exif=exif, quality=90)
    ours, stored = decode_with_size(data, "x", ImageConfig(size=size))
    reference = pillow_reference(data, size)
    assert stored == (width, height)
    assert ours.shape == reference.shape == (size, size, 3)
    # libjpeg-turbo either way: equal up to IDCT rounding (0 here); decoding 800x600 at full scale instead of
    # Pillow's 1/2 already differs by 0.43 on average, a wrong rotation by far more.
    assert np.abs(ours.astype(np.int16) - reference).mean() < 0.05
    assert np.abs(ours.astype(np.int16) - reference).max() <= 2


def test_turbo_decode_keeps_the_orientation_of_every_exif_value():
    image = photo(90, 60)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(image, "JPEG", exif=exif, quality=95)
        ours = decode_image(data, "x", ImageConfig(size=48)).astype(np.int16)
        assert np.abs(ours - pillow_reference(data, 48)).mean() < 0.05, orientation


def test_turbo_decode_refuses_a_truncated_jpeg_as_corrupt():
    data = encode(photo(200, 150), "JPEG")
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2], "cut.jpg", ImageConfig(size=64))
    assert err.value.reason == "corrupt_image" and "cut.jpg" in str(err.value)


def test_only_ycbcr_and_greyscale_jpegs_take_the_turbo_path(monkeypatch):
    calls = []
    decode = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k) or decode(*a, **k))
    for mode, fmt in [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP")]:
        decode_image(encode(photo(64, 48, mode), fmt), "x", ImageConfig(size=32))
    assert len(calls) == 2 and all(call["colorspace"] == "RGB" for call in calls)
