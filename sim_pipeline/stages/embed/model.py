"""Loading a CLIP or SigLIP checkpoint once per process and turning pixels or captions into unit
vectors, exactly as the family's own reference computation does.

Reference, per family: ``AutoModel`` + ``AutoProcessor``, ``get_image_features`` on the
processor's image inputs and ``get_text_features`` on its text inputs, with the text padding the
family's model card prescribes (``families.py``). Where a family's towers can be loaded alone with
identical outputs, a stage loads only the tower it needs, which halves its memory.

torch and transformers are imported only here, inside functions, so stages that need no model
(plan, fetch, join-score, finalize, and any fully cached stage) start fast and stay small.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim_pipeline.core.errors import UserError
from sim_pipeline.stages.embed.cpu import BF16_FLAGS, CPUINFO, cpu_flags
from sim_pipeline.stages.embed.families import Family, checkpoint_folder, resolve_model
from sim_pipeline.stages.embed.native_memory import (
    checkpoint_mappings,
    drop_mapped_pages,
    return_free_memory,
)
from sim_pipeline.stages.embed.pixels import pixel_values_function

if TYPE_CHECKING:
    import torch
    from PIL import Image

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def resolve_device(device: str) -> str:
    """``auto``: CUDA, else Apple's MPS, else the CPU. Answered without importing torch where
    the answer is certain (no GPU driver, or a torch built without CUDA), so a run whose
    vectors are all cached never loads torch."""
    if device != "auto":
        return device
    if "torch" not in sys.modules and _surely_cpu():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _surely_cpu() -> bool:
    """True when no GPU can be in use: not macOS, and no NVIDIA driver or a CPU-only torch."""
    if sys.platform == "darwin":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    if not Path("/proc/driver/nvidia/version").exists():
        return True
    return _torch_cuda_version() is None


def _torch_cuda_version() -> str | None:
    """The CUDA version torch was built with, read from its ``version.py`` (no import)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        for line in version.read_text(encoding="utf-8").splitlines():
            if line.startswith("cuda"):
                value = line.split("=", 1)[1].strip().strip("'\"")
                return None if value in ("None", "") else value
    except OSError:
        return "unknown"
    return None


def cpu_supports_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX): detected, not assumed."""
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


BF16_MIN_WIDTH = 256  # narrower towers gain nothing from bf16 and lose more accuracy to it


def resolve_precision(precision: str, device: str, width: int | None = None) -> str:
    """``auto``: fp16 on CUDA; bf16 on CPUs built for it, for towers at least
    ``BF16_MIN_WIDTH`` wide (``width``: the narrower tower's hidden size, None if unknown), where
    bf16 pays off and its error averages out; fp32 otherwise."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    wide = width is None or width >= BF16_MIN_WIDTH
    if device == "cpu" and wide and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def model_width(model_name: str) -> int | None:
    """The narrower tower's hidden size, from the checkpoint's ``config.json`` read as plain
    JSON (a folder, or the local hub cache): no transformers import. None when unknown."""
    folder = checkpoint_folder(model_name)
    if folder is None:
        return None
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        widths = [int(config[side]["hidden_size"]) for side in ("vision_config", "text_config")
                  if isinstance(config.get(side), dict) and "hidden_size" in config[side]]
    except (OSError, ValueError, TypeError):
        return None
    return min(widths) if widths else None


def resolved_precision(device: str, precision: str, model_name: str | None = None) -> str:
    """The precision a run will really use (imports torch only when a GPU may be present)."""
    device = resolve_device(device)
    if precision != "auto" or device != "cpu" or model_name is None:
        return resolve_precision(precision, device)
    return resolve_precision(precision, device, model_width(model_name))


@dataclass
class Encoder:
    """One side (``image`` or ``text``) of a checkpoint with its processor; encodes batches into
    L2-normalised float32 arrays.

    ``module`` is the tower alone where that is exact (``family.towers``), else the whole model,
    whose ``get_image_features`` / ``get_text_features`` then run. bf16 runs under autocast
    (matrix products in bf16, norms in fp32); fp16 (CUDA) casts the weights.
    """

    module: Any
    processor: Any
    family: Family
    device: str
    precision: str
    tower: str
    text_length: int
    pixel_values: Callable[[Iterable[Image.Image]], Any]

    def preprocess(self, images: Iterable[Image.Image]) -> dict[str, torch.Tensor]:
        """The checkpoint's image processor's inputs (CLIP's bit for bit, faster); thread-safe,
        so decode workers call it."""
        import torch

        inputs = self.pixel_values(images)
        if isinstance(inputs, np.ndarray):
            inputs = {"pixel_values": inputs}
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
        if self.device == "cuda":
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors

    def encode_pixels(self, inputs: Mapping[str, torch.Tensor]) -> np.ndarray:
        return self._encode(**inputs)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        """The family's text inputs: CLIP pads to the batch's longest caption (its attention mask
        makes that exact); SigLIP pools the last position, so it pads to ``max_length`` as it
        was trained. Both truncate at the model's limit."""
        padding: bool | str = "max_length" if self.family.pad_to_max_length else True
        tokens = self.processor(text=texts, padding=padding, truncation=True,
                                max_length=self.text_length, return_tensors="pt")
        return {k: v for k, v in tokens.items() if k in TEXT_INPUTS}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self._encode(**self.tokenize(texts))

    def _features(self, **inputs: Any) -> torch.Tensor:
        if self.family.towers is None:
            method = "get_image_features" if self.tower == "image" else "get_text_features"
            output = getattr(self.module, method)(**inputs)
        else:
            output = self.module(**inputs)
        field = self.family.outputs[0 if self.tower == "image" else 1]
        return getattr(output, field)

    def _encode(self, **inputs: Any) -> np.ndarray:
        import torch

        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        moved = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None,
                         non_blocking=True) for k, v in inputs.items()}
        # No cast cache: it would hold a bf16 copy of every weight, as fast without it.
        autocast = (torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False)
                    if self.precision == "bf16" else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = self._features(**moved).float()
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()


@functools.cache
def _freeze_what_lives_on() -> None:
    """Once, before the first tower loads: what is alive then (torch, transformers: ~450,000
    objects) lives as long as the process, so it leaves the collector's reach, and the
    collection that frees a tower (``release_encoders``) scans only what came after: it took
    0.26 s, three times a run, before. Only once: later garbage stays collectable."""
    import gc

    gc.freeze()


@functools.lru_cache(maxsize=4)
def load_encoder(model_name: str, device: str = "auto", precision: str = "auto",
                 tower: str = "image") -> Encoder:
    """Load one side (``image`` or ``text``) of ``model_name`` (hub id or folder), once."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # loading one tower reports the other's weights as unused
    resolved = resolve_model(model_name)
    _freeze_what_lives_on()
    device = resolve_device(device)
    precision = resolved_precision(device, precision, model_name)
    weights = torch.float16 if precision == "fp16" else torch.float32
    family = resolved.family
    try:
        if family.towers is None:
            module = transformers.AutoModel.from_pretrained(model_name, dtype=weights)
        else:
            loader = getattr(transformers, family.towers[0 if tower == "image" else 1])
            module = loader.from_pretrained(model_name, dtype=weights,
                                            config=resolved.tower_config(tower))
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(resolved.load_failure(error)) from None
    module.to(device).eval()
    if precision == "bf16":
        _store_linear_weights_in_bf16(module)
    processor = resolved.processor
    return Encoder(module, processor, family, device, precision, tower, resolved.text_length,
                   pixel_values_function(processor))


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

    loaded = load_encoder.cache_info().currsize
    load_encoder.cache_clear()
    if loaded:
        gc.collect()
    return_free_memory()

