"""Image bytes -> upright 8-bit RGB: the odd images the web serves, decoded correctly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sim_pipeline.core import errors
from sim_pipeline.stages.decode import DecodeFailed, decode_image, inspect_image, sniff_image_format
from tests.conftest import make_image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def code_of(data: bytes, **options: int) -> str:
    with pytest.raises(DecodeFailed) as failure:
        decode_image(data, **options)
    return failure.value.code


def test_a_cmyk_jpeg_becomes_the_right_rgb() -> None:
    cmyk = Image.new("RGB", (32, 32), (200, 30, 40)).convert("CMYK")
    assert close(pixel(decode_image(encode(cmyk, "JPEG", quality=95))), (200, 30, 40))


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40)
    assert close(pixel(decoded, (10, 5)), (0, 0, 255)), "the left half is now on top"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close(pixel(decode_image(data)), (255, 0, 0))


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert close(pixel(decode_image(encode(grey, "PNG"))), (128, 128, 128), 1)


def test_palette_transparency_and_alpha_are_composited_over_white() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    clear_rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    decoded = decode_image(encode(palette, "PNG", transparency=0))
    assert pixel(decoded) == (255, 255, 255) and pixel(decoded, (1, 1)) == (255, 0, 0)
    assert pixel(decode_image(encode(clear_rgba, "PNG"))) == (255, 255, 255)
    assert close(pixel(decode_image(encode(half_red, "PNG"))), (255, 127, 127), 2)
    assert pixel(decode_image(encode(grey_alpha, "PNG"))) == (255, 255, 255)
    assert close(pixel(decode_image(encode(half_red, "WEBP", lossless=True))), (255, 127, 127), 2)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "I;16"])
def test_every_common_mode_becomes_rgb(mode: str) -> None:
    data = make_image(seed=5, fmt="PNG", mode=mode if mode != "I;16" else "L")
    assert decode_image(data).mode == "RGB"


def test_a_truncated_jpeg_is_a_decode_error() -> None:
    data = make_image(seed=7, size=(400, 300))
    cut = data[: len(data) * 3 // 4]
    assert inspect_image(cut).width == 400, "the header alone still reads"
    assert code_of(cut) == errors.DECODE_ERROR
    assert code_of(data[:600]) == errors.DECODE_ERROR, "cut inside the header"


def test_the_pixel_cap_is_checked_from_the_header() -> None:
    data = make_image(seed=2, fmt="PNG", size=(2000, 1000))
    assert code_of(data, max_pixels=1_999_999) == errors.TOO_MANY_PIXELS
    with pytest.raises(DecodeFailed):
        inspect_image(data, max_pixels=1_999_999)
    assert decode_image(data, max_pixels=2_000_000).size == (2000, 1000)


@pytest.mark.parametrize("data", [b"", b"<html>", b"%!PS-Adobe-3.0 EPSF-3.0", b"GIF8"])
def test_bytes_that_are_no_image_we_decode_are_not_an_image(data: bytes) -> None:
    assert sniff_image_format(data) is None
    assert code_of(data) == errors.NOT_AN_IMAGE


def test_a_file_whose_magic_lies_is_a_decode_error() -> None:
    assert code_of(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10) == errors.DECODE_ERROR
