"""The ONNX backend's model inputs read from the checkpoint's files, without transformers or torch.

An ONNX run needs from the checkpoint only what turns images and captions into the exported
towers' inputs, and for a local CLIP checkpoint that is plain data: the image processor's
settings (``processor_config.json``, or ``preprocessor_config.json`` in older saves), which
``pixels.FastClipPixels`` replicates bit for bit, and ``tokenizer.json``, which the ``tokenizers``
library (what transformers' fast tokenizer itself runs) reads as is. Reading them directly keeps
an ONNX run whose exports exist free of the torch and transformers imports, seconds of a cold run
and hundreds of MB. Anything this does not replicate exactly (a checkpoint not on this machine,
another image processor, no ``tokenizer.json``, left padding) gives None, and the run uses
transformers' processor as before. Parity with transformers' processor is tested.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from sim_pipeline.stages.embed.families import UNBOUNDED, checkpoint_folder
from sim_pipeline.stages.embed.pixels import FastClipPixels

IMAGE_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
# Every setting FastClipPixels reads: a file that leaves one to transformers' defaults is not
# read here, so no default of ours can drift from transformers'.
PIXEL_SETTINGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "size",
                  "crop_size", "resample", "rescale_factor", "image_mean", "image_std")


@dataclass(frozen=True)
class PlainInputs:
    """Pixels and tokens for the exported CLIP towers, as ``CLIPProcessor`` makes them."""

    pixels: FastClipPixels
    tokenizer: Any  # a ``tokenizers.Tokenizer`` truncating and padding to the batch's longest
    text_length: int

    def tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int64, padded to the longest caption of ``texts``."""
        encodings = self.tokenizer.encode_batch(texts)
        if not encodings:
            empty = np.zeros((0, 0), dtype=np.int64)
            return empty, empty
        return (np.array([e.ids for e in encodings], dtype=np.int64),
                np.array([e.attention_mask for e in encodings], dtype=np.int64))


@functools.lru_cache(maxsize=8)
def plain_inputs(model_name: str) -> PlainInputs | None:
    """The inputs of a local CLIP checkpoint read from its files, or None where only
    transformers' processor can be trusted to make them."""
    folder = checkpoint_folder(model_name)
    if folder is None:
        return None
    config = _json(folder / "config.json")
    if config is None or config.get("model_type") != "clip":
        return None
    pixels = _pixels(folder)
    text = _tokenizer(folder, config)
    if pixels is None or text is None:
        return None
    return PlainInputs(pixels, *text)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pixels(folder: Path) -> FastClipPixels | None:
    """FastClipPixels from the saved image processor settings, when they say CLIP's."""
    settings = (_json(folder / "processor_config.json") or {}).get("image_processor")
    if not isinstance(settings, dict):
        settings = _json(folder / "preprocessor_config.json")
    if (not isinstance(settings, dict)
            or settings.get("image_processor_type") not in IMAGE_PROCESSORS
            or not all(key in settings for key in PIXEL_SETTINGS)
            or not isinstance(settings["size"], dict)
            or not isinstance(settings["crop_size"], dict)):
        return None
    try:
        return FastClipPixels.matching(SimpleNamespace(**{"do_pad": False, **settings}))
    except (KeyError, TypeError, ValueError):
        return None


def _tokenizer(folder: Path, config: dict[str, Any]) -> tuple[Any, int] | None:
    """``tokenizer.json`` set to truncate at the model's limit and pad right to the longest, as
    ``processor(text=..., padding=True, truncation=True, max_length=...)`` does; and that limit."""
    settings = _json(folder / "tokenizer_config.json")
    text_config = config.get("text_config")
    if (settings is None or settings.get("tokenizer_class") not in TOKENIZERS
            or settings.get("padding_side", "right") != "right"
            or settings.get("truncation_side", "right") != "right"
            or not isinstance(text_config, dict)
            or "max_position_embeddings" not in text_config
            or not (folder / "tokenizer.json").is_file()):
        return None
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # tokenizers raises plain Exception for a file it cannot read
        return None
    pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
    if pad_id is None:
        return None
    limit = int(text_config["max_position_embeddings"])
    declared = settings.get("model_max_length") or UNBOUNDED
    length = min(limit, int(declared)) if declared < UNBOUNDED else limit
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)
    return tokenizer, length
