"""The seed design, as a baseline to beat: threads download, CLIPProcessor, CLIPModel, fp32.

One process; downloads with a ThreadPoolExecutor, then batches of pairs through ``CLIPProcessor``
and ``CLIPModel`` in fp32, cosine mapped to (cos + 1) / 2. No caching, no overlap, no streaming.

    python bench/seed_baseline.py MODEL INPUT.csv OUTPUT.csv
"""

from __future__ import annotations

import csv
import io
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

BATCH = 32


def download(url: str) -> bytes | None:
    try:
        response = httpx.get(url, timeout=20)
        return response.content if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


def main(model_path: str, source: str, output: str) -> None:
    with open(source, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with ThreadPoolExecutor(16) as pool:
        images = list(pool.map(download, [r["url"] for r in rows]))
    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    scores: list[str] = []
    for start in range(0, len(rows), BATCH):
        batch = [(r, img) for r, img in zip(rows[start:start + BATCH],
                                             images[start:start + BATCH], strict=True)]
        good = [(r, Image.open(io.BytesIO(img)).convert("RGB")) for r, img in batch if img]
        inputs = processor(text=[r["caption"] for r, _ in good], images=[i for _, i in good],
                           return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text = model.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image, text).tolist()
        scores += [f"{(c + 1) / 2:.4f}" for c in cosine]
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "similarity"])
        writer.writerows([r["url"], r["caption"], s] for r, s in zip(rows, scores, strict=False))


if __name__ == "__main__":
    main(*sys.argv[1:4])
