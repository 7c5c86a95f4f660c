"""Our staged scores equal the textbook CLIPProcessor + CLIPModel computation."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from sim_pipeline import score_pairs
from sim_pipeline.core.config import Settings
from tests.conftest import ImageServer
from tests.pairs import serve_good_images


def reference_similarity(model: CLIPModel, processor: CLIPProcessor, image_bytes: bytes,
                         caption: str) -> float:
    image = Image.open(io.BytesIO(image_bytes))
    # truncation only matters for the over-long caption, which CLIP cannot take whole
    inputs = processor(text=[caption], images=[image], return_tensors="pt", padding=True,
                       truncation=True, max_length=77)
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_emb = model.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb).item()
    return (cosine + 1) / 2


@pytest.mark.parametrize("precision", ["fp32"])
def test_similarity_matches_the_reference_within_0_001(
        settings: Settings, tiny_model: Path, image_server: ImageServer, precision: str) -> None:
    urls = serve_good_images(image_server, 9, prefix="parity")
    captions = ["a red square", "two dogs playing in the snow", "plain",
                "a very long caption " + "with many words " * 30, "ünïcödé, \"quoted\" text",
                "a cat", "a photo", "🙂 emoji caption", "x"]
    pairs = list(zip(urls, captions, strict=True))
    results = list(score_pairs(pairs, settings.replace(precision=precision)))

    model = CLIPModel.from_pretrained(tiny_model).eval()
    processor = CLIPProcessor.from_pretrained(tiny_model)
    spread = set()
    for (url, caption), result in zip(pairs, results, strict=True):
        assert result.error is None
        body = image_server.routes[url.removeprefix(image_server.url(""))].body
        expected = reference_similarity(model, processor, body, caption)
        assert result.similarity == pytest.approx(expected, abs=1e-3)
        spread.add(result.similarity)
    assert len(spread) > 3, "distinct pairs should not all score the same"
