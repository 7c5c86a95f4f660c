"""The fast pixel path gives CLIPImageProcessor's output exactly; bf16 weights give autocast's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sim_pipeline.stages.decode import decode_image
from sim_pipeline.stages.embed.model import load_encoder
from sim_pipeline.stages.embed.pixels import FastClipPixels, pixel_values_function
from tests.conftest import make_image

SIZES = [(640, 480), (480, 640), (224, 224), (225, 224), (1000, 223), (50, 20), (1, 1),
         (333, 777), (2048, 97)]


def clip_image_processor() -> object:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


def images_of_every_mode() -> list[Image.Image]:
    """Not decoded by us: what a caller of ``encode_images`` might pass in."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (240, 320, 4), dtype=np.uint8), "RGBA")
    modes = [rgba.convert(mode) for mode in ("RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "F")]
    keyed = rgba.convert("RGB")
    keyed.info["transparency"] = (0, 0, 0)
    return [*modes, rgba.convert("RGBA").convert("PA"), keyed]


def images_of_every_shape() -> list[Image.Image]:
    images = [decode_image(make_image(seed, size=size)) for seed, size in enumerate(SIZES)]
    grey = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8))
    png = io.BytesIO()
    Image.new("RGBA", (300, 200), (10, 200, 30, 90)).save(png, format="PNG")
    return [*images, decode_image(png.getvalue()), grey.convert("RGB")]


def test_fast_pixels_equal_clip_image_processor_bit_for_bit() -> None:
    processor = clip_image_processor()
    images = images_of_every_shape()
    fast = FastClipPixels.matching(processor)
    assert fast is not None
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    got = fast(images)
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(images), 3, 224, 224)
    assert np.array_equal(got, expected)


def test_fast_pixels_convert_every_mode_as_the_processor_does() -> None:
    processor = clip_image_processor()
    for image in images_of_every_mode():
        expected = processor(images=[image], return_tensors="np")["pixel_values"]
        assert np.array_equal(FastClipPixels.matching(processor)([image]), expected), image.mode


@pytest.mark.parametrize("change", [{"do_center_crop": False}, {"do_normalize": False},
                                    {"size": {"height": 200, "width": 300}},
                                    {"crop_size": {"height": 256, "width": 256}}])
def test_other_processor_settings_fall_back_to_the_processor(change: dict) -> None:
    processor = clip_image_processor()
    for name, value in change.items():
        setattr(processor, name, value)
    assert FastClipPixels.matching(processor) is None
    images = [decode_image(make_image(seed, size=(640, 480))) for seed in range(3)]
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    assert np.array_equal(pixel_values_function(processor)(images)["pixel_values"], expected)


def test_encoders_use_the_fast_path(tiny_model: Path) -> None:
    encoder = load_encoder(str(tiny_model), "cpu", "fp32", "image")
    assert isinstance(encoder.pixel_values, FastClipPixels)
    images = images_of_every_shape()
    reference = encoder.processor.image_processor(images=images, return_tensors="pt")
    assert np.array_equal(encoder.preprocess(images)["pixel_values"].numpy(),
                          reference["pixel_values"].numpy())


def test_bf16_keeps_linear_weights_in_bf16_with_the_same_embeddings_as_autocast(
        tiny_model: Path) -> None:
    import torch

    images = images_of_every_shape()
    texts = ["a photo of a cat", "two dogs on a beach at sunset", "a red car"]
    for tower in ("image", "text"):
        fp32 = load_encoder(str(tiny_model), "cpu", "fp32", tower)
        bf16 = load_encoder(str(tiny_model), "cpu", "bf16", tower)
        linear = [m for m in bf16.module.modules() if isinstance(m, torch.nn.Linear)]
        norms = [m for m in bf16.module.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
        assert norms and all(m.weight.dtype == torch.float32 for m in norms)
        fp32.precision = "bf16"  # autocast over fp32 weights: what bf16 computed before
        try:
            if tower == "image":
                expected, got = fp32.encode_images(images), bf16.encode_images(images)
            else:
                expected, got = fp32.encode_texts(texts), bf16.encode_texts(texts)
        finally:
            fp32.precision = "fp32"
        assert np.array_equal(got, expected), tower
