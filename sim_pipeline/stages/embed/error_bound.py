"""How far a quantised run's scores are from fp32's, measured on that run's own pairs.

int8 weights move every embedding a little; what a user needs to know is how much that moves the
scores they get. So each ``onnx-int8`` run scores a sample of its own pairs (the first
``SAMPLE_PAIRS`` scored rows) a second time with the fp32 export of the same checkpoint, and
reports the largest and the 99th-percentile ``|similarity(int8) - similarity(fp32)|``
(unrounded). The fp32 export is cached beside the int8 one and the fp32 vectors in the vector
cache, so this costs a few dozen images and captions through the fp32 model once, and a run
over known pairs loads no model at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, caption_hash, image_key, image_meta_key, model_tag
from sim_pipeline.core.store import IntegrityError, ObjectStore, read_json
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.embed.sets import load_embedding_set, scorable
from sim_pipeline.stages.embed.vector_cache import VectorCache
from sim_pipeline.stages.plan import read_chunk_rows

SAMPLE_PAIRS = 48
QUANTISED = {"onnx-int8": "onnx"}  # quantised backend -> the fp32 backend it is measured against


@dataclass(frozen=True)
class ErrorBound:
    """``|similarity - fp32 similarity|`` over ``pairs`` of the run's own pairs."""

    pairs: int
    largest: float
    p99: float

    def render(self) -> str:
        return (f"|similarity - fp32| max {self.largest:.4f}, p99 {self.p99:.4f} "
                f"over {self.pairs} of this run's pairs")


@dataclass(frozen=True)
class _Pair:
    url_hash: str
    sha: str  # of the image's bytes: the vector cache's key
    caption: str
    image: np.ndarray  # the run's own (quantised) unit vectors
    text: np.ndarray


def measure_error_bound(chunks: Iterable[ChunkRef], store: ObjectStore,
                        settings: Settings) -> ErrorBound | None:
    """The bound for a quantised backend's run; None for fp32 backends or a run with no
    scored pair. fp32 vectors are cached like any run's (under the fp32 backend's tag), so a
    rerun over known pairs loads no model to measure it."""
    reference_backend = QUANTISED.get(settings.backend)
    if reference_backend is None:
        return None
    pairs = _sample(chunks, store, settings)
    tag = model_tag(settings.model, reference_backend)
    images, texts = VectorCache(store, tag, "images"), VectorCache(store, tag, "texts")
    exact_images = images.get_many(p.sha for p in pairs)
    exact_texts = texts.get_many(caption_hash(p.caption) for p in pairs)
    missing = [p for p in pairs if p.sha not in exact_images]
    if missing:
        exact_images.update(_embed_images(missing, store, settings, reference_backend))
        images.put_many({p.sha: exact_images[p.sha] for p in missing if p.sha in exact_images})
    captions = {caption_hash(p.caption): p.caption for p in pairs}
    unknown = sorted(captions.keys() - exact_texts.keys())
    if unknown:
        encoder = _reference(settings, reference_backend, "text")
        new = dict(zip(unknown, encoder.encode_texts([captions[h] for h in unknown]),
                       strict=True))
        texts.put_many(new)
        exact_texts.update(new)
    pairs = [p for p in pairs if p.sha in exact_images]  # an image that no longer decodes
    if not pairs:
        return None
    quantised = np.array([np.dot(p.image, p.text) for p in pairs], dtype=np.float64)
    exact = np.array([np.dot(exact_images[p.sha].astype(np.float64),
                             exact_texts[caption_hash(p.caption)].astype(np.float64))
                      for p in pairs])
    differences = np.abs(quantised - exact) / 2  # similarity = (cosine + 1) / 2
    return ErrorBound(len(pairs), float(differences.max()),
                      float(np.quantile(differences, 0.99)))


def _reference(settings: Settings, backend: str, tower: str) -> Any:
    from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

    return load_onnx_encoder(settings.model, backend, tower, settings.store, settings.s3)


def _embed_images(pairs: list[_Pair], store: ObjectStore, settings: Settings,
                  backend: str) -> dict[str, np.ndarray]:
    """fp32 vectors of the pairs' images, by sha; an image gone or undecodable is left out."""
    encoder = _reference(settings, backend, "image")
    shas, pixels = [], []
    for pair in {p.sha: p for p in pairs}.values():
        try:
            data = store.read_bytes(image_key(pair.url_hash))
            pixels.append(encoder.preprocess([decode_image(data, settings.max_pixels)]))
        except (KeyError, IntegrityError, DecodeFailed):
            continue  # scored earlier, gone or damaged since
        shas.append(pair.sha)
    if not shas:
        return {}
    return dict(zip(shas, encoder.encode_pixels(np.concatenate(pixels)), strict=True))


def _sample(chunks: Iterable[ChunkRef], store: ObjectStore, settings: Settings) -> list[_Pair]:
    """The first ``SAMPLE_PAIRS`` rows, in input order, that the run scored, with the run's own
    vectors."""
    tag = model_tag(settings.model, settings.variant)
    pairs: list[_Pair] = []
    for chunk in chunks:
        images = load_embedding_set(store, chunk.image_embeddings_key(tag))
        texts = load_embedding_set(store, chunk.text_embeddings_key(tag))
        image_at, text_at = images.lookup(), texts.lookup()
        for row in scorable(read_chunk_rows(store, chunk)):
            if row.url_hash not in image_at or row.url_hash in images.errors:
                continue
            try:
                sha = str(read_json(store, image_meta_key(row.url_hash))["sha256"])
            except (KeyError, IntegrityError):
                continue  # scored earlier, its record gone or damaged since
            pairs.append(_Pair(row.url_hash, sha, row.caption,
                               images.vectors[image_at[row.url_hash]],
                               texts.vectors[text_at[caption_hash(row.caption)]]))
            if len(pairs) == SAMPLE_PAIRS:
                return pairs
    return pairs
