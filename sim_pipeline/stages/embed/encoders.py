"""Which encoder embeds a stage's inputs: the torch tower, or its ONNX Runtime export.

torch and transformers are imported only when an encoder is really needed, so a fully cached
stage never loads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import model_tag

if TYPE_CHECKING:
    from sim_pipeline.stages.embed.remote import InferenceClient


def vector_tag(settings: Settings) -> str:
    """Cache vectors under the precision really used, so CPU and GPU vectors never mix."""
    if settings.backend != "torch":
        from sim_pipeline.stages.embed.onnx_backend import export_variant

        return model_tag(settings.model, export_variant(settings.backend))
    from sim_pipeline.stages.embed.model import resolved_precision

    precision = resolved_precision(settings.device, settings.precision, settings.model)
    return model_tag(settings.model, precision)


def encoder_for(settings: Settings, tower: str):  # noqa: ANN202 - imported lazily
    """The torch tower, or its ONNX Runtime export when ``SIM_PIPELINE_BACKEND`` asks for it."""
    if settings.backend != "torch":
        from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

        return load_onnx_encoder(settings.model, settings.backend, tower, settings.store,
                                 settings.s3)
    from sim_pipeline.stages.embed.model import load_encoder

    return load_encoder(settings.model, settings.device, settings.precision, tower)


@contextmanager
def remote_encoder(settings: Settings) -> Iterator[InferenceClient]:
    """The inference service of ``SIM_PIPELINE_INFERENCE_URL``: the stage sends store keys and
    captions, and gets back the vectors the service's own model computed (no torch here)."""
    from sim_pipeline.stages.embed.remote import InferenceClient

    with InferenceClient(settings.inference_url, settings.model,
                         api_key=settings.inference_api_key or None) as client:
        yield client
