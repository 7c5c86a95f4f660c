"""Embed-stage speed: the bare model on ready tensors vs our stage from cached image bytes.

Prints images/s for both at the same precision, their ratio (goal >= 0.8: decoding and
preprocessing must hide behind the model), texts/s padded to the longest vs to 77 tokens, and the
cosine of each precision's embeddings against fp32's; with ``--onnx``, each ONNX backend's speed
beside its score error against fp32 (int8's bound: goal < 0.002).
Random ViT-B/32 weights: speed only.

    .venv/bin/python bench/embed.py [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import BENCH_DIR, vit_b32_checkpoint, write_images
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, image_key, image_meta_key, model_tag, sha256_hex
from sim_pipeline.core.store import LocalStore, write_json
from sim_pipeline.stages.decode import decode_image
from sim_pipeline.stages.embed.doctor import cpu_line
from sim_pipeline.stages.embed.images import embed_images_chunk
from sim_pipeline.stages.embed.model import load_encoder, resolve_precision
from sim_pipeline.stages.embed.sets import load_embedding_set
from sim_pipeline.stages.plan import normalise_row, write_chunks


def stage_store(count: int) -> tuple[LocalStore, ChunkRef]:
    """A store holding ``count`` fetched 640x480 JPEGs and one planned chunk over them."""
    folder = BENCH_DIR / "images-640"
    names = write_images(folder, count)
    root = BENCH_DIR / "embed-store"
    shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(root)
    rows = []
    for i, name in enumerate(names):
        url = f"http://images.test/{name}"
        data = (folder / name).read_bytes()
        url_hash = sha256_hex(url)
        store.write_bytes(image_key(url_hash), data)
        write_json(store, image_meta_key(url_hash), {
            "url": url, "error": None, "status": 200, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "format": "jpeg"})
        rows.append(normalise_row(i, url, f"caption {i}", [url, f"caption {i}"]))
    (chunk,) = write_chunks(store, "bench", "embed", rows, len(rows))
    return store, chunk


def bare_model(settings: Settings, pixels: dict[str, torch.Tensor]) -> float:
    encoder = load_encoder(settings.model, settings.device, settings.precision, "image")
    count, size = len(pixels["pixel_values"]), settings.batch_size
    encoder.encode_pixels({k: v[:size] for k, v in pixels.items()})  # warm-up
    started = time.perf_counter()
    for start in range(0, count, size):
        encoder.encode_pixels({k: v[start : start + size] for k, v in pixels.items()})
    return count / (time.perf_counter() - started)


def embed_stage(settings: Settings, store: LocalStore, chunk: ChunkRef) -> tuple[float, np.ndarray]:
    """The embed-images stage with nothing cached but the image bytes."""
    shutil.rmtree(store.root / "embeddings", ignore_errors=True)
    key = chunk.image_embeddings_key(model_tag(settings.model, settings.variant))
    for suffix in (".json", ".npy"):
        Path(store.uri(key + suffix)).unlink(missing_ok=True)
    started = time.perf_counter()
    embed_images_chunk(chunk, store, settings)
    seconds = time.perf_counter() - started
    return chunk.rows / seconds, load_embedding_set(store, key).vectors


def texts_per_second(settings: Settings, pad_to_77: bool, texts: list[str]) -> tuple[float, Any]:
    encoder = load_encoder(settings.model, settings.device, settings.precision, "text")
    tokenizer = encoder.processor.tokenizer
    started = time.perf_counter()
    out = []
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        tokens = tokenizer(batch, padding="max_length" if pad_to_77 else True, truncation=True,
                           max_length=77, return_tensors="pt")
        out.append(encoder._encode(input_ids=tokens["input_ids"],
                                   attention_mask=tokens["attention_mask"]))
    return len(texts) / (time.perf_counter() - started), np.concatenate(out)


def compare(device: str, count: int, batch_size: int, rounds: int,
            precisions: list[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Bare model vs embed stage per precision on ``device``; returns each one's vectors and
    embed-stage images/s."""
    model = str(vit_b32_checkpoint())
    store, chunk = stage_store(count)
    images = [decode_image((BENCH_DIR / "images-640" / f"{i:06d}.jpg").read_bytes())
              for i in range(count)]
    vectors, rates = {}, {}
    for precision in dict.fromkeys(precisions):
        settings = Settings(model=model, device=device, precision=precision,
                            batch_size=batch_size)
        pixels = load_encoder(model, device, precision, "image").preprocess(images)
        bare_model(settings, pixels)  # warm-up: kernels for this shape and precision
        bare, stage = 0.0, 0.0
        for _ in range(rounds):  # alternate, keep the best: the machine is shared
            bare = max(bare, bare_model(settings, pixels))
            rate, vectors[precision] = embed_stage(settings, store, chunk)
            stage = max(stage, rate)
        print(f"{device} {precision}: bare model {bare:7.1f} images/s | embed stage from cached "
              f"bytes {stage:7.1f} images/s | stage/bare {stage / bare:.2f}")
        rates[precision] = stage
    return vectors, rates


def compare_onnx(count: int, batch_size: int, reference: np.ndarray,
                 torch_rates: dict[str, float]) -> None:
    """The ONNX Runtime backends' embed stage (export cached first) against torch's: speed-up
    over each torch precision's embed stage, cosine against torch fp32 vectors, and the score
    error: ``|similarity - fp32 similarity|`` over every image x caption pair (max, p99)."""
    from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

    model = str(vit_b32_checkpoint())
    store, chunk = stage_store(count)
    captions = [f"a photo of scene number {i} with " + "some colourful shapes " * (i % 4)
                for i in range(count)]
    fp32_texts = load_encoder(model, "cpu", "fp32", "text").encode_texts(captions)
    exact = reference @ fp32_texts.T
    for backend in ("onnx", "onnx-int8"):
        settings = Settings(model=model, device="cpu", backend=backend, batch_size=batch_size,
                            store=str(store.root))
        load_onnx_encoder(model, backend, "image", settings.store)  # export once, untimed
        rate, vectors = embed_stage(settings, store, chunk)
        texts = load_onnx_encoder(model, backend, "text", settings.store).encode_texts(captions)
        cosine = np.sum(vectors * reference, axis=1)
        error = np.abs(vectors @ texts.T - exact).ravel() / 2  # similarity = (cosine + 1) / 2
        speedups = ", ".join(f"x{rate / torch_rate:.2f} torch {precision}"
                             for precision, torch_rate in torch_rates.items())
        print(f"cpu {backend}: embed stage {rate:6.1f} images/s ({speedups}) | cosine vs torch "
              f"fp32 min {cosine.min():.6f} | |similarity - fp32| max {error.max():.5f} "
              f"p99 {np.quantile(error, 0.99):.5f} over {error.size} pairs")


def compare_texts(device: str, precision: str, count: int = 256) -> None:
    model = str(vit_b32_checkpoint())
    captions = [("a photo of " + "a very long and winding caption " * (i % 5)).strip()
                for i in range(count)]
    settings = Settings(model=model, device=device, precision=precision)
    texts_per_second(settings, False, captions[:64])  # warm-up
    longest, e1 = texts_per_second(settings, False, captions)
    full, e2 = texts_per_second(settings, True, captions)
    print(f"{device} texts ({precision}, batch 64): padded to longest {longest:.1f}/s, "
          f"to 77 {full:.1f}/s, x{longest / full:.2f}; max |diff| {np.abs(e1 - e2).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also the ONNX Runtime backends")
    args = parser.parse_args()
    default = resolve_precision("auto", "cpu")
    print(cpu_line())
    print(f"torch threads {torch.get_num_threads()}, {args.images} images 640x480, "
          f"batch {args.batch_size}, default precision here: {default}")
    vectors, rates = compare("cpu", args.images, args.batch_size, args.rounds, [default, "fp32"])
    if default != "fp32":
        cos = np.sum(vectors[default] * vectors["fp32"], axis=1)
        print(f"{default} vs fp32 image embeddings: min cosine {cos.min():.6f}, "
              f"mean {cos.mean():.6f}")
    if args.onnx:
        compare_onnx(args.images, args.batch_size, vectors["fp32"], rates)
    compare_texts("cpu", "fp32")
    if default != "fp32":
        compare_texts("cpu", default)


if __name__ == "__main__":
    main()
