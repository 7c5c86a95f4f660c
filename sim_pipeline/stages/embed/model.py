"""Loading a CLIP checkpoint once per process and turning pixels or captions into unit vectors.

torch and transformers are imported only here, inside functions, so stages that need no model
(plan, fetch, join-score, finalize, and any fully cached stage) start fast and stay small.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim_pipeline.core.errors import UserError
from sim_pipeline.stages.embed.native_memory import (
    checkpoint_mappings,
    drop_mapped_pages,
    return_free_memory,
)
from sim_pipeline.stages.embed.pixels import pixel_values_function

if TYPE_CHECKING:
    import torch
    from PIL import Image


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_supports_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX): detected, not assumed."""
    try:
        flags = set(cpuinfo.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: fp16 on CUDA, bf16 on CPUs built for it, fp32 otherwise."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    if device == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


@dataclass
class ClipEncoder:
    """One tower of a CLIP model (image or text) with its processor; encodes batches into
    L2-normalised float32 arrays.

    Only the tower a stage needs is loaded, which halves the memory of each stage. bf16 runs under
    autocast (matrix products in bf16, norms in fp32): cosine >= 0.99999 against fp32, where casting
    the whole model does not hold that. fp16 (CUDA) casts the weights.
    """

    model: Any
    processor: Any
    device: str
    precision: str
    tower: str
    pixel_values: Callable[[Iterable[Image.Image]], np.ndarray]

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def preprocess(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """CLIPProcessor's image pipeline, bit for bit; thread-safe, so decode workers call it."""
        import torch

        pixels = torch.from_numpy(self.pixel_values(images))
        return pixels.pin_memory() if self.device == "cuda" else pixels

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self._encode("image_embeds", pixel_values=pixels)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Padded to the longest caption of the batch, truncated at the model's limit (77)."""
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True,
                                          max_length=self.max_text_length, return_tensors="pt")
        return self._encode("text_embeds", input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"])

    def _encode(self, output: str, **inputs: Any) -> np.ndarray:
        import torch

        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        moved = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None,
                         non_blocking=True) for k, v in inputs.items()}
        # No cast cache: it would hold a bf16 copy of every weight, as fast without it.
        autocast = (torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False)
                    if self.precision == "bf16" else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = getattr(self.model(**moved), output).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


@functools.lru_cache(maxsize=4)
def load_encoder(model_name: str, device: str = "auto", precision: str = "auto",
                 tower: str = "image") -> ClipEncoder:
    """Load one tower (``image`` or ``text``) of ``model_name`` (hub id or folder), once."""
    import torch
    from transformers import (
        CLIPProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # loading one tower reports the other's weights as unused
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    weights = torch.float16 if precision == "fp16" else torch.float32
    loader = CLIPVisionModelWithProjection if tower == "image" else CLIPTextModelWithProjection
    try:
        model = loader.from_pretrained(model_name, dtype=weights)
        processor = CLIPProcessor.from_pretrained(model_name)
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"Could not load the model {model_name!r} ({reason}); set SIM_PIPELINE_MODEL to a "
            "Hugging Face hub id or a folder saved with save_pretrained."
        ) from None
    model.to(device).eval()
    if precision == "bf16":
        _store_linear_weights_in_bf16(model)
    return ClipEncoder(model, processor, device, precision, tower,
                       pixel_values_function(processor.image_processor))


def _store_linear_weights_in_bf16(model: torch.nn.Module) -> None:
    """Keep Linear weights in bf16, everything else in fp32, in memory of its own.

    Autocast casts every Linear's weight and bias to bf16 on each call anyway, so storing them in
    bf16 gives identical outputs (tested) with half the weight memory and no per-call cast; norms,
    embeddings and the patch convolution stay fp32 as autocast wants them. Each checkpoint tensor
    is copied, then its memory-mapped pages are dropped, so the fp32 checkpoint and its copy are
    never resident together.
    """
    import torch

    mappings = checkpoint_mappings()
    with torch.no_grad():
        for module in model.modules():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                keep = torch.bfloat16 if isinstance(module, torch.nn.Linear) else tensor.dtype
                source = tensor.data
                tensor.data = source.to(keep, copy=True)
                if source.is_contiguous():
                    drop_mapped_pages(source.data_ptr(), source.nbytes, mappings)


def release_encoders() -> None:
    """Free loaded towers, e.g. between the image and the text stage of an in-process run."""
    import gc

    load_encoder.cache_clear()
    gc.collect()
    return_free_memory()


def resolved_precision(device: str, precision: str) -> str:
    """The precision a run will really use (imports torch only to look for a GPU)."""
    return resolve_precision(precision, resolve_device(device))
