"""``sim-pipeline doctor``: what each precision and backend does on this machine, measured.

``precision=auto`` reads CPU flags, and flags can lie: a virtual CPU may advertise bf16 that is
emulated, or VNNI that its host throttles. So the doctor runs the checkpoint's image tower through
every option on the same ready pixels and prints images/s beside the cosine of its embeddings
against torch fp32's, and which option ``auto`` picks, so a user can choose with numbers.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sim_pipeline.core.config import Settings
from sim_pipeline.stages.embed.cpu import CPUINFO, cpu_flags, int8_weight_type

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_line(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model and the flags that decide precision and int8 speed."""
    model = "unknown CPU"
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags(cpuinfo)
    present = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return f"CPU: {model}, {os.cpu_count()} CPUs, flags: {present}"


@dataclass(frozen=True)
class Measured:
    backend: str
    precision: str
    images_per_second: float
    min_cosine: float  # of its image embeddings against torch fp32's

    def render(self) -> str:
        name = self.precision if self.backend == "torch" else self.backend
        return (f"{name:10s} {self.images_per_second:8.1f} images/s   cosine vs fp32 "
                f"min {self.min_cosine:.6f}")


def options(device: str) -> list[tuple[str, str]]:
    """``(backend, precision)`` pairs worth measuring on ``device``."""
    found = [("torch", "fp32"), ("torch", "fp16" if device == "cuda" else "bf16")]
    if device == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        found += [("onnx", "fp32"), ("onnx-int8", "fp32")]
    return found


def sample_images(count: int, size: tuple[int, int] = (640, 480)) -> list[Image.Image]:
    """Deterministic photo-like images (gradients and noise): speed does not depend on content."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    images = []
    for _ in range(count):
        base = np.stack([(x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5) + c * 60) % 256
                         for c in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _rate(encode: Callable[[Any], np.ndarray], batches: list[Any]) -> tuple[float, np.ndarray]:
    encode(batches[0])  # warm-up: kernels for this shape
    started = time.perf_counter()
    vectors = np.concatenate([encode(batch) for batch in batches])
    return len(vectors) / (time.perf_counter() - started), vectors


def diagnose(settings: Settings, count: int = 64) -> tuple[str, list[Measured]]:
    """Which device and precision ``auto`` picks here, and each option measured on ``count``
    images in batches of ``settings.batch_size``."""
    from sim_pipeline.stages.embed.model import load_encoder, resolve_device, resolved_precision

    device = resolve_device(settings.device)
    picked = resolved_precision(device, "auto", settings.model)
    reference = load_encoder(settings.model, device, "fp32", "image")
    images = sample_images(count)
    size = settings.batch_size
    pixels = [reference.preprocess(images[i:i + size]) for i in range(0, count, size)]
    fp32: np.ndarray | None = None
    measured = []
    for backend, precision in options(device):
        if backend == "torch":
            encoder: Any = load_encoder(settings.model, device, precision, "image")
        else:
            from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

            encoder = load_onnx_encoder(settings.model, backend, "image", settings.store,
                                        settings.s3)
        rate, vectors = _rate(encoder.encode_pixels, pixels)
        fp32 = vectors if fp32 is None else fp32
        cosine = float(np.sum(vectors * fp32, axis=1).min())
        measured.append(Measured(backend, precision, rate, cosine))
    return f"auto picks: device {device}, precision {picked}", measured


def report(settings: Settings, count: int = 64) -> str:
    picked, measured = diagnose(settings, count)
    int8 = ([f"onnx-int8 weights here: {int8_weight_type()} (s8 where the CPU has VNNI or AMX "
             "or is not x86; u8 on x86 without them, where s8 products saturate)"]
            if any(m.backend == "onnx-int8" for m in measured) else [])
    return "\n".join([cpu_line(), picked,
                      f"image tower of {settings.model}, {count} images 640x480, batches of "
                      f"{settings.batch_size}, inputs ready (decoding not counted):",
                      *("  " + m.render() for m in measured), *int8,
                      "choose with --precision / --backend (or SIM_PIPELINE_PRECISION, "
                      "SIM_PIPELINE_BACKEND); onnx-int8 runs also report their score error"])
