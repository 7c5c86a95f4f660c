"""How far a quantised run's scores are from fp32's, measured on that run's own pairs.

int8 weights move every embedding a little; what a user needs to know is how much that moves the
scores they get. So each ``onnx-int8`` run scores a sample of its own pairs (the first
``SAMPLE_PAIRS`` scored rows) a second time with the fp32 export of the same checkpoint, and
reports the largest and the 99th-percentile ``|similarity(int8) - similarity(fp32)|``
(unrounded). The fp32 export is cached beside the int8 one, so this costs a few dozen images and
captions through the fp32 model, never a torch import once the exports exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import ChunkRef, caption_hash, image_key, model_tag
from sim_pipeline.core.store import IntegrityError, ObjectStore
from sim_pipeline.stages.decode import DecodeFailed, decode_image
from sim_pipeline.stages.embed.sets import load_embedding_set, scorable
from sim_pipeline.stages.plan import read_chunk_rows

if TYPE_CHECKING:
    from PIL import Image

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
    caption: str
    pixels: np.ndarray  # the fp32 encoder's input for the image
    image: np.ndarray  # the run's own (quantised) unit vectors
    text: np.ndarray


def measure_error_bound(chunks: Iterable[ChunkRef], store: ObjectStore,
                        settings: Settings) -> ErrorBound | None:
    """The bound for a quantised backend's run; None for fp32 backends or a run with no
    scored pair."""
    reference_backend = QUANTISED.get(settings.backend)
    if reference_backend is None:
        return None
    from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

    image_encoder, text_encoder = (
        load_onnx_encoder(settings.model, reference_backend, tower, settings.store, settings.s3)
        for tower in ("image", "text"))
    pairs = _sample(chunks, store, settings, image_encoder.preprocess)
    if not pairs:
        return None
    images = image_encoder.encode_pixels(np.concatenate([p.pixels for p in pairs]))
    texts = text_encoder.encode_texts([p.caption for p in pairs])
    quantised = np.array([np.dot(p.image, p.text) for p in pairs], dtype=np.float64)
    exact = np.sum(images.astype(np.float64) * texts.astype(np.float64), axis=1)
    differences = np.abs(quantised - exact) / 2  # similarity = (cosine + 1) / 2
    return ErrorBound(len(pairs), float(differences.max()),
                      float(np.quantile(differences, 0.99)))


def _sample(chunks: Iterable[ChunkRef], store: ObjectStore, settings: Settings,
            preprocess: Callable[[list[Image.Image]], np.ndarray]) -> list[_Pair]:
    """The first ``SAMPLE_PAIRS`` rows, in input order, that the run scored, with their image
    preprocessed for the fp32 encoder and the run's own vectors."""
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
                data = store.read_bytes(image_key(row.url_hash))
                pixels = preprocess([decode_image(data, settings.max_pixels)])
            except (KeyError, IntegrityError, DecodeFailed):
                continue  # scored earlier, gone or damaged since: another row will do
            pairs.append(_Pair(row.caption, pixels, images.vectors[image_at[row.url_hash]],
                               texts.vectors[text_at[caption_hash(row.caption)]]))
            if len(pairs) == SAMPLE_PAIRS:
                return pairs
    return pairs
