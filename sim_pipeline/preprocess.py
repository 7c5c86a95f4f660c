"""Turning image bytes into model input, exactly as ``CLIPProcessor`` would.

The format is decided by magic bytes, never by the server's Content-Type. Decoding applies the EXIF
orientation and takes the first frame of an animation; resizing, cropping and normalising are left
to the checkpoint's own image processor, so preprocessing matches ``CLIPProcessor`` bit for bit.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from sim_pipeline import errors

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


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> an upright RGB image (first frame), or ``DecodeFailed``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except Image.DecompressionBombError:
        raise DecodeFailed(errors.TOO_MANY_PIXELS) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise DecodeFailed(errors.DECODE_ERROR) from None
