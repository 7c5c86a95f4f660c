"""Turning image bytes into model input, exactly as ``CLIPProcessor`` would, but safely.

The format is decided by magic bytes, never by the server's Content-Type, and Pillow is only ever
offered the one decoder those bytes name (no Ghostscript for an "image" that is really EPS). The
pixel count is checked from the header before any pixel is decoded (decompression bombs). Decoding
takes the first frame of an animation and applies the EXIF orientation; 16-bit, CMYK, palette and
alpha images become 8-bit RGB (transparency over white). Resizing, cropping and normalising are
left to the checkpoint's own image processor, so preprocessing matches ``CLIPProcessor``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from sim_pipeline.core import errors
from sim_pipeline.core.config import DEFAULT_MAX_PIXELS

_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (4, b"ftypavif", "avif"),
    (4, b"ftypavis", "avif"),
)
_PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                   "webp": "WEBP", "avif": "AVIF"}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def sniff_image_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None when they are not an image's."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


class DecodeFailed(Exception):
    """An image that cannot become pixels; ``code`` is the row's error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) with the single decoder the magic bytes name; check the pixel count."""
    image_format = sniff_image_format(data)
    if image_format is None:
        raise DecodeFailed(errors.NOT_AN_IMAGE)
    image = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[image_format]])
    if image.width * image.height > max_pixels:
        image.close()
        raise DecodeFailed(errors.TOO_MANY_PIXELS)
    return image


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and size from the header alone: cheap enough for the fetch stage."""
    try:
        with _open(data, max_pixels) as image:
            return ImageInfo(sniff_image_format(data) or "", image.width, image.height)
    except Image.DecompressionBombError:
        raise DecodeFailed(errors.TOO_MANY_PIXELS) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise DecodeFailed(errors.DECODE_ERROR) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an upright 8-bit RGB image (first frame), or ``DecodeFailed``.

    An image that is already upright RGB is returned as decoded, not copied: a photo near the
    pixel cap is 150 MB, and each needless copy would add that to the stage's peak memory.
    """
    try:
        with _open(data, max_pixels) as image:
            image.seek(0)
            image.load()
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError:
        raise DecodeFailed(errors.TOO_MANY_PIXELS) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise DecodeFailed(errors.DECODE_ERROR) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: high bit depths scaled (not clipped), transparency over white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_gray(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, or ``I`` holding 16-bit samples) and float gray -> ``L``.

    Pillow's own conversion clips at 255, which turns most 16-bit images white.
    """
    pixels = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(pixels, 0.0, 1.0) * 255.0 if pixels.max(initial=0) <= 1.0 else pixels
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    wide = pixels.astype(np.int64)
    return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
