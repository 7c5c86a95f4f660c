"""The model families sim-pipeline scores with, and how each one is checked and computed.

A checkpoint's family is its config's ``model_type``; anything else is refused with one sentence
that names the families. ``resolve_model`` reads the config and the processor (never the
weights), so a run can check its model in seconds before any image is fetched.

- CLIP (``CLIPModel``): each tower alone (``CLIP{Vision,Text}ModelWithProjection``), its
  projection size taken from the top-level config; captions padded to the batch's longest.
- SigLIP (``SiglipModel``): each tower alone (``Siglip{Vision,Text}Model``); captions padded to
  ``max_length`` as the model card prescribes (the text tower pools the last position).
- SigLIP 2 (``Siglip2Model``): the whole model (``get_*_features``); ``max_length`` padding.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim_pipeline.core.errors import UserError
from sim_pipeline.core.store import IntegrityError, ObjectStore, read_json, write_json

UNBOUNDED = 1_000_000  # a tokenizer's model_max_length above this means "not set"


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str
    towers: tuple[str, str] | None  # (image, text) classes that hold one tower exactly, if any
    outputs: tuple[str, str]  # the output field that holds the (image, text) features
    pad_to_max_length: bool


FAMILIES: dict[str, Family] = {
    "clip": Family("CLIP", "CLIPModel",
                   ("CLIPVisionModelWithProjection", "CLIPTextModelWithProjection"),
                   ("image_embeds", "text_embeds"), pad_to_max_length=False),
    "siglip": Family("SigLIP", "SiglipModel", ("SiglipVisionModel", "SiglipTextModel"),
                     ("pooler_output", "pooler_output"), pad_to_max_length=True),
    "siglip2": Family("SigLIP 2", "Siglip2Model", None,
                      ("pooler_output", "pooler_output"), pad_to_max_length=True),
}
SUPPORTED = ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())


@dataclass(frozen=True)
class Resolved:
    """A checkpoint's family, config and processor: everything but its weights."""

    name: str
    family: Family
    config: Any
    processor: Any

    @property
    def text_length(self) -> int:
        """Captions are truncated (and SigLIP's padded) to this many tokens: the text tower's
        position limit, or the tokenizer's own limit when that is smaller."""
        limit = int(self.config.text_config.max_position_embeddings)
        declared = getattr(self.processor.tokenizer, "model_max_length", None) or UNBOUNDED
        return min(limit, int(declared)) if declared < UNBOUNDED else limit

    def tower_config(self, tower: str) -> Any:
        """The config one tower is built from, with the dimensions the whole model would use.

        CLIP's towers read ``projection_dim`` from their sub-config, which some checkpoints leave
        at its default while the top-level one (what ``CLIPModel`` uses) differs (transformers
        issue #25622): the top-level value wins here.
        """
        sub = copy.deepcopy(self.config.vision_config if tower == "image"
                            else self.config.text_config)
        if hasattr(self.config, "projection_dim") and hasattr(sub, "projection_dim"):
            sub.projection_dim = self.config.projection_dim
        return sub

    def load_failure(self, error: BaseException) -> str:
        return _could_not_load(self.name, error)


def _could_not_load(name: str, error: BaseException) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"Could not load the model {name!r} ({reason}); set SIM_PIPELINE_MODEL (or --model) "
            "to a Hugging Face hub id or a folder saved with save_pretrained.")


@functools.lru_cache(maxsize=8)
def resolve_model(name: str) -> Resolved:
    """Config and processor of ``name`` (hub id or folder), or one sentence saying why not."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(_could_not_load(name, error)) from None
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None:
        kind = getattr(config, "model_type", None) or "an unknown kind of"
        raise UserError(f"The model {name!r} is a {kind} checkpoint; sim-pipeline scores with "
                        f"the {SUPPORTED} families.")
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(_could_not_load(name, error)) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UserError(f"The model {name!r} has no image processor and tokenizer saved with "
                        "it; save its processor with save_pretrained next to the weights.")
    return Resolved(name, family, config, processor)


def check_backend(name: str, backend: str) -> Resolved:
    """``name`` resolved, or ``UserError`` when it cannot be scored with ``backend``: the ONNX
    export covers the CLIP family only."""
    resolved = resolve_model(name)
    if backend != "torch" and resolved.family is not FAMILIES["clip"]:
        raise UserError(f"SIM_PIPELINE_BACKEND={backend} exports CLIP checkpoints only and "
                        f"{name!r} is a {resolved.family.name} checkpoint: use "
                        "SIM_PIPELINE_BACKEND=torch.")
    return resolved


def checkpoint_folder(name: str) -> Path | None:
    """The local folder holding ``name``'s files: the folder itself, or its snapshot in the
    hub cache; None when neither is on this machine. No transformers import."""
    if (Path(name) / "config.json").is_file():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub id either (a folder that does not exist, say)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_fingerprint(name: str) -> str | None:
    """A digest of every file of the checkpoint's folder (name, size, modification time): it
    changes whenever a file is added, replaced or edited. None when the folder is not local."""
    folder = checkpoint_folder(name)
    if folder is None:
        return None
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def checked_family(name: str, backend: str, store: ObjectStore) -> str:
    """The family's name once ``check_backend`` passed (for an ONNX run whose towers are
    exported: once its input files read, ``_exported_clip``), remembered in ``store`` per
    checkpoint fingerprint and backend: a later run of an unchanged local checkpoint is checked
    without importing transformers or torch, so a fully cached run stays cheap."""
    fingerprint = checkpoint_fingerprint(name)
    key = f"model-checks/{fingerprint}-{backend}.json" if fingerprint else None
    if key is not None and store.exists(key):
        try:
            return str(read_json(store, key)["family"])
        except (KeyError, IntegrityError, TypeError):
            pass  # damaged: check again and rewrite it
    family = _exported_clip(name, backend, store) or check_backend(name, backend).family.name
    if key is not None:
        write_json(store, key, {"model": name, "backend": backend, "family": family})
    return family


def _exported_clip(name: str, backend: str, store: ObjectStore) -> str | None:
    """CLIP's name for an ONNX run whose towers are exported in ``store`` and whose inputs can
    be read from the checkpoint's files (``plain_inputs.py``): that is all such a run needs, so
    it is checked by reading them, without importing transformers. None otherwise."""
    if backend == "torch":
        return None
    from sim_pipeline.stages.embed.onnx_backend import export_key
    from sim_pipeline.stages.embed.plain_inputs import plain_inputs

    if not all(store.exists(export_key(name, backend, tower)) for tower in ("image", "text")):
        return None
    return FAMILIES["clip"].name if plain_inputs(name) is not None else None
