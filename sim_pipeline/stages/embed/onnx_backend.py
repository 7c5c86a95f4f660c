"""ONNX Runtime backend (opt-in: ``SIM_PIPELINE_BACKEND=onnx`` or ``onnx-int8``).

Each tower is exported once from the loaded checkpoint (fp32, through torch's ONNX exporter),
optionally quantised to dynamic int8 (per channel, matrix products only), and cached in the
object store keyed by model and export settings; later runs and other workers load the cached
file and never touch torch for inference. Pixels and tokens come from the checkpoint's files
(``plain_inputs.py``) where that is exact, so a run whose exports exist imports neither torch nor
transformers; else from transformers' processor. CLIP checkpoints only
(``families.check_backend`` refuses others in one sentence). Same interface as
``model.Encoder``: ``preprocess``, ``encode_pixels``, ``encode_texts``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import model_tag
from sim_pipeline.core.store import S3Options, open_store
from sim_pipeline.stages.embed.cpu import int8_weight_type
from sim_pipeline.stages.embed.families import check_backend
from sim_pipeline.stages.embed.pixels import pixel_values_function
from sim_pipeline.stages.embed.plain_inputs import plain_inputs

if TYPE_CHECKING:
    from PIL import Image

Pixels = Callable[[Iterable["Image.Image"]], Any]
Tokens = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # (input_ids, attention_mask)
EXPORT_VERSION = "opset17-v2"  # part of the cache key: change it when the export changes
INPUTS = {"image": ("pixel_values",), "text": ("input_ids", "attention_mask")}


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


@dataclass
class OnnxEncoder:
    session: Any
    pixel_values: Pixels
    tokens: Tokens
    tower: str

    def preprocess(self, images: Iterable[Image.Image]) -> np.ndarray:
        return self.pixel_values(images)

    def encode_pixels(self, pixels: np.ndarray | dict[str, Any]) -> np.ndarray:
        values = pixels["pixel_values"] if isinstance(pixels, dict) else pixels
        (out,) = self.session.run(None, {"pixel_values": np.asarray(values, dtype=np.float32)})
        return _normalise(out.astype(np.float32))

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokens(texts)
        (out,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return _normalise(out.astype(np.float32))


def export_tower(model_name: str, tower: str) -> bytes:
    """The tower as fp32 ONNX bytes."""
    import torch

    from sim_pipeline.stages.embed.model import load_encoder

    encoder = load_encoder(model_name, "cpu", "fp32", tower)
    output = "image_embeds" if tower == "image" else "text_embeds"

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = encoder.module

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return getattr(self.inner(**dict(zip(INPUTS[tower], inputs, strict=True))), output)

    if tower == "image":
        example: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, 224, 224),)
        axes = {"pixel_values": {0: "batch"}}
    else:
        example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # tracer chatter about shapes we keep dynamic on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(Tower().eval(), example, buffer, input_names=list(INPUTS[tower]),
                          output_names=["embeds"], dynamic_axes={**axes, "embeds": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def _quantize(model: bytes, weights: str) -> bytes:
    """Dynamic int8 (VNNI/AMX kernels where the CPU has them) of the matrix products only, with
    one scale per output channel and ``weights`` (``s8`` or ``u8``, ``cpu.int8_weight_type``):
    on ViT-B/32-shaped weights this keeps the largest ``|similarity - fp32|`` near 0.0016,
    against 0.0022 per tensor over every operator (docs/performance.md); each run measures its
    own (``error_bound.py``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "fp32.onnx"), Path(folder, "int8.onnx")
        source.write_bytes(model)
        logging.disable(logging.WARNING)  # advice to pre-process that does not apply here
        try:
            weight_type = QuantType.QInt8 if weights == "s8" else QuantType.QUInt8
            quantize_dynamic(source, target, weight_type=weight_type, per_channel=True,
                             op_types_to_quantize=["MatMul"])
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def export_variant(backend: str) -> str:
    """The backend as exports and vectors are keyed: ``onnx-int8`` quantised with uint8 weights
    (this CPU's choice, ``cpu.int8_weight_type``) is ``onnx-int8-u8``, so machines that share a
    store never read each other's differently quantised towers or vectors."""
    if backend == "onnx-int8" and int8_weight_type() == "u8":
        return "onnx-int8-u8"
    return backend


def export_key(model_name: str, backend: str, tower: str) -> str:
    """Where a tower's export is cached: the fp32 one is kept beside the int8 one, so the int8
    run's error bound (``error_bound.py``) needs no second export."""
    return f"onnx/{model_tag(model_name, export_variant(backend))}-{EXPORT_VERSION}/{tower}.onnx"


@functools.lru_cache(maxsize=4)
def load_onnx_encoder(model_name: str, backend: str, tower: str, store_location: str,
                      s3: S3Options | None = None) -> OnnxEncoder:
    """Load the cached export of ``tower``, exporting (and caching) it on first use."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("SIM_PIPELINE_BACKEND=onnx needs onnxruntime: pip install "
                        "'sim-pipeline[onnx]'.") from None
    pixel_values, tokens = _inputs(model_name, backend)  # refuses a non-CLIP checkpoint first
    store = open_store(store_location, s3)
    key = export_key(model_name, backend, tower)
    if not store.exists(key):
        exported = export_tower(model_name, tower)
        if not store.exists(export_key(model_name, "onnx", tower)):
            store.write_bytes(export_key(model_name, "onnx", tower), exported)
        if backend == "onnx-int8":
            exported = _quantize(exported, int8_weight_type())
        store.write_bytes(key, exported)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(store.read_bytes(key), options,
                                           providers=["CPUExecutionProvider"])
    return OnnxEncoder(session, pixel_values, tokens, tower)


def _inputs(model_name: str, backend: str) -> tuple[Pixels, Tokens]:
    """The pixel and token functions: read from the checkpoint's files where that is exact,
    else transformers' processor (``check_backend`` then also refuses a non-CLIP checkpoint)."""
    plain = plain_inputs(model_name)
    if plain is not None:
        return plain.pixels, plain.tokens
    resolved = check_backend(model_name, backend)
    tokenizer, length = resolved.processor.tokenizer, resolved.text_length

    def tokens(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        made = tokenizer(texts, padding=True, truncation=True, max_length=length,
                         return_tensors="np")
        return (made["input_ids"].astype(np.int64), made["attention_mask"].astype(np.int64))

    return pixel_values_function(resolved.processor), tokens
