"""Decode any image Pillow reads into an upright RGB picture, or say exactly why not.

Training, ``data check`` and serving all decode through :func:`load_image`, so a photo that
trains is a photo that serves, and a file that breaks one breaks the other with the same reason.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions we treat as images, and the Pillow format their content should have. A file with
# one of these names whose bytes say otherwise is reported by `data check` (it still trains).
EXTENSION_FORMATS: dict[str, tuple[str, ...]] = {
    ".jpg": ("JPEG", "MPO"),  # cameras write MPO (multi-picture JPEG); its first frame is a JPEG
    ".jpeg": ("JPEG", "MPO"),
    ".jpe": ("JPEG", "MPO"),
    ".jfif": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".gif": ("GIF",),
    ".bmp": ("BMP",),
    ".dib": ("DIB", "BMP"),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
    ".ppm": ("PPM",),
    ".pgm": ("PPM",),
    ".pbm": ("PPM",),
    ".pnm": ("PPM",),
    ".tga": ("TGA",),
    ".ico": ("ICO",),
}
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS)

# Pillow's own bomb limit (about 89 megapixels); a larger image is refused, not decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # these rotate by 90 degrees, swapping width and height


class ImageDecodeError(ValueError):
    """A file that is not a usable image; ``reason`` is one short human-readable line."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


def is_image_name(name: str) -> bool:
    """True when ``name`` has an image extension we decode (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def extension_matches(name: str, image_format: str | None) -> bool:
    """True when the Pillow ``image_format`` is what the file's extension promises."""
    expected = EXTENSION_FORMATS.get(os.path.splitext(name)[1].lower())
    return expected is None or image_format in expected


def _open(source: bytes | str | Path | BinaryIO) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, str | Path) and os.path.getsize(source) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    return Image.open(source)


def decode_image(
    source: bytes | str | Path | BinaryIO,
    decode_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, str, tuple[int, int]]:
    """Decode like :func:`load_image` and also return the file's format and its upright size.

    The size is the full stored size (before any reduced-size JPEG decode), with width and
    height swapped when the EXIF orientation rotates the picture.
    """
    name = str(source) if isinstance(source, str | Path) else None
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _open(source)
            image_format = im.format or "unknown"
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (possible decompression bomb)"
                )
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            upright = (
                (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
            )
            if decode_size and image_format in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= decode_size.
                im.draft("RGB", (decode_size, decode_size))
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated GIF/WebP: the first frame is the picture
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im), image_format, upright
    except ImageDecodeError as e:
        if e.source or not name:
            raise
        raise ImageDecodeError(e.reason, name) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can identify", name) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"possible decompression bomb: {e}", name) from None
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise ImageDecodeError(f"permission denied: {e}", name) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as e:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError and friends.
        reason = str(e) or type(e).__name__
        reason = "truncated file" if "truncated" in reason.lower() else f"corrupt image: {reason}"
        raise ImageDecodeError(reason, name) from None


def load_image(
    source: bytes | str | Path | BinaryIO,
    decode_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode any Pillow-readable image into RGB with its EXIF orientation applied.

    GIF and WebP animations give their first frame; CMYK, grayscale, palette and 16-bit images
    are converted (16-bit by scaling, not clipping); transparent pixels are laid on white.

    Args:
        source: encoded bytes, a local path, or a binary file object.
        decode_size: the shorter side the caller needs. JPEGs at least twice that size are
            decoded at reduced scale (Pillow ``draft()``), which is much faster; the result is
            still at least ``decode_size`` on its shorter side.
        max_pixels: refuse images with more pixels than this (decompression bombs);
            ``None`` disables the check.

    Returns:
        The decoded RGB image.

    Raises:
        ImageDecodeError: the bytes are empty, truncated, corrupt, not an image, or too large.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    return decode_image(source, decode_size, max_pixels)[0]


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    # Pillow's own convert("L") clips 16-bit values at 255, turning most pixels white.
    arr = arr.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif mode == "F":
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
