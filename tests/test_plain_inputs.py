"""The ONNX backend's inputs read from a checkpoint's files are transformers' own, token for token
and pixel for pixel, and anything not replicated falls back to transformers' processor."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from sim_pipeline.stages.embed.families import resolve_model
from sim_pipeline.stages.embed.plain_inputs import plain_inputs
from tests.conftest import make_image

CAPTIONS = [
    "a cat",
    "",
    "   lots   of\tspaces\nand a newline  ",
    "Ünïcödé café, naïve façade — 東京の写真 🐈",
    "UPPER case and punctuation!!! (really?) #tag @name 3.14",
    "a very long caption " + "with many repeated words " * 40,  # past the 77-token limit
]


def test_tokens_are_the_processors_own(tiny_model: Path) -> None:
    plain = plain_inputs(str(tiny_model))
    assert plain is not None
    resolved = resolve_model(str(tiny_model))
    assert plain.text_length == resolved.text_length
    for batch in ([c] for c in CAPTIONS), [CAPTIONS]:
        for texts in batch:
            expected = resolved.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=resolved.text_length,
                return_tensors="np")
            ids, mask = plain.tokens(texts)
            assert ids.dtype == mask.dtype == np.int64
            np.testing.assert_array_equal(ids, expected["input_ids"])
            np.testing.assert_array_equal(mask, expected["attention_mask"])


def test_pixels_are_the_processors_own(tiny_model: Path) -> None:
    plain = plain_inputs(str(tiny_model))
    assert plain is not None
    processor = resolve_model(str(tiny_model)).processor.image_processor
    images = [Image.open(io.BytesIO(make_image(seed, size=size)))
              for seed, size in enumerate([(640, 480), (97, 311), (224, 224), (300, 7)])]
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(plain.pixels(images), expected)


def edited_copy(tiny_model: Path, folder: Path, name: str, **changes: object) -> str:
    """A copy of the checkpoint with ``changes`` merged into its JSON file ``name``."""
    shutil.copytree(tiny_model, folder)
    data = json.loads((folder / name).read_text(encoding="utf-8"))
    (folder / name).write_text(json.dumps({**data, **changes}), encoding="utf-8")
    return str(folder)


def test_what_is_not_replicated_is_left_to_transformers(tmp_path: Path, tiny_model: Path) -> None:
    assert plain_inputs("no-such-org/no-such-model") is None, "not on this machine"
    assert plain_inputs(edited_copy(tiny_model, tmp_path / "siglip", "config.json",
                                    model_type="siglip")) is None, "not CLIP"
    assert plain_inputs(edited_copy(tiny_model, tmp_path / "left", "tokenizer_config.json",
                                    padding_side="left")) is None
    no_tokenizer_json = tmp_path / "no-tokenizer-json"
    shutil.copytree(tiny_model, no_tokenizer_json)
    (no_tokenizer_json / "tokenizer.json").unlink()
    assert plain_inputs(str(no_tokenizer_json)) is None
