"""Loading a CLIP checkpoint once per process and turning pixels or captions into unit vectors.

torch and transformers are imported only here, inside functions, so stages that need no model
(plan, fetch, join-score, finalize) start fast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sim_pipeline.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """fp16 on CUDA, fp32 elsewhere, unless asked otherwise."""
    if precision != "auto":
        return precision
    return "fp16" if device == "cuda" else "fp32"


@dataclass
class ClipEncoder:
    """A loaded model with its processor; encodes batches into L2-normalised float32 arrays."""

    model: Any
    processor: Any
    device: str
    precision: str

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self._encode(self.model.get_image_features, pixel_values=pixels)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True,
                                          max_length=self.max_text_length, return_tensors="pt")
        return self._encode(self.model.get_text_features, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"])

    def _encode(self, forward: Any, **inputs: Any) -> np.ndarray:
        import torch

        dtype = self.model.dtype
        moved = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
                 for k, v in inputs.items()}
        with torch.inference_mode():
            features = forward(**moved).pooler_output.float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


@functools.lru_cache(maxsize=2)
def load_encoder(model_name: str, device: str = "auto", precision: str = "auto") -> ClipEncoder:
    """Load ``model_name`` (hub id or local folder) once per process."""
    import torch
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    try:
        model = CLIPModel.from_pretrained(model_name, dtype=getattr(torch, DTYPES[precision]))
        processor = CLIPProcessor.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"Could not load the model {model_name!r} ({reason}); set SIM_PIPELINE_MODEL to a "
            "Hugging Face hub id or a folder saved with save_pretrained."
        ) from None
    model.to(device).eval()
    return ClipEncoder(model, processor, device, precision)
