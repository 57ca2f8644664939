"""Decoding every format Pillow reads into upright RGB, and clear reasons for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visiontune.data.images import ImageDecodeError, decode_image, load_image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


RED = Image.new("RGB", (40, 30), (200, 20, 20))


@pytest.mark.parametrize(
    "data",
    [
        encode(RED, "JPEG"),
        encode(RED, "PNG"),
        encode(RED, "BMP"),
        encode(RED, "WEBP", lossless=True),
        encode(RED.convert("CMYK"), "JPEG"),
        encode(RED.convert("L"), "PNG"),
        encode(RED.convert("P"), "GIF"),
        encode(RED.convert("RGBA"), "PNG"),
        encode(RED, "TIFF"),
    ],
    ids=["jpeg", "png", "bmp", "webp", "cmyk-jpeg", "gray-png", "gif", "rgba-png", "tiff"],
)
def test_every_format_becomes_rgb_of_the_same_size(data):
    im = load_image(data)
    assert im.mode == "RGB" and im.size == (40, 30)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    im = load_image(encode(Image.fromarray(arr), "PNG"))
    assert im.mode == "RGB"
    assert abs(int(np.asarray(im)[0, 0, 0]) - 128) <= 1  # not 255 (clipped)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (10, 10), c) for c in (1, 2, 3)]
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756
    for f in frames:
        f.putpalette(palette)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(Image.new("RGB", (60, 20), "white"), "JPEG", exif=exif)
    im, _, upright = decode_image(data)
    assert im.size == (20, 60) and upright == (20, 60)


def test_transparent_pixels_are_laid_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_large_jpeg_decodes_at_reduced_size_but_not_below_decode_size():
    data = encode(Image.new("RGB", (1600, 1200), "blue"), "JPEG")
    im, fmt, full = decode_image(data, decode_size=256)
    assert fmt == "JPEG" and full == (1600, 1200)
    assert im.size == (400, 300)  # 1/4 scale: 1/8 would make the short side 150 < 256
    assert load_image(data).size == (1600, 1200)


def test_bad_files_raise_with_a_reason(tmp_path):
    good = encode(RED, "JPEG")
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(b"this is a text file, not a photo")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file") as e:
        load_image(tmp_path / "zero.png")
    assert "zero.png" in str(e.value)


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="over the limit"):
        load_image(data, max_pixels=1_000_000)
    assert load_image(data, max_pixels=None).size == (3000, 3000)
