"""int8 weights chosen by what the CPU multiplies without saturating, and kept apart in the store.

x86 CPUs without VNNI or AMX multiply ONNX Runtime's uint8 activations by int8 weights with
AVX2's ``vpmaddubsw``, whose int16 sums saturate; uint8 weights take a kernel that widens first.
Tiny random-weight checkpoint: scores are meaningless, only the distance to fp32 is checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from sim_pipeline.core.config import Settings
from sim_pipeline.stages.decode import decode_image
from sim_pipeline.stages.embed import onnx_backend
from sim_pipeline.stages.embed.cpu import int8_weight_type
from sim_pipeline.stages.embed.encoders import vector_tag
from sim_pipeline.stages.embed.plain_inputs import plain_inputs
from tests.conftest import make_image


@pytest.mark.parametrize(("cpuinfo", "weights"), [
    ("flags\t: fpu sse2 avx2 fma\n", "u8"),
    ("flags\t: fpu sse2 avx2 avx512f avx512_vnni\n", "s8"),
    ("flags\t: fpu sse2 avx2 avx_vnni\n", "s8"),
    ("flags\t: fpu sse2 avx2 amx_tile amx_int8\n", "s8"),
    ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", "s8"),  # not x86: no vpmaddubsw
])
def test_int8_weights_follow_the_cpus_flags(tmp_path: Path, cpuinfo: str, weights: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: some CPU\n" + cpuinfo)
    assert int8_weight_type(path) == weights
    assert int8_weight_type(tmp_path / "missing") == "s8", "unreadable: as before, signed"


def matmul_weight_types(model: bytes) -> set[np.dtype]:
    graph = onnx.load_from_string(model).graph
    return {numpy_helper.to_array(init).dtype for init in graph.initializer
            if init.name.endswith("_quantized")}


def image_vectors(model: bytes, pixels: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"pixel_values": pixels})
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_both_weight_types_quantise_every_matrix_product_near_fp32(tiny_model: Path) -> None:
    exported = onnx_backend.export_tower(str(tiny_model), "image")
    quantised = {weights: onnx_backend._quantize(exported, weights) for weights in ("s8", "u8")}
    assert matmul_weight_types(quantised["s8"]) == {np.dtype(np.int8)}
    assert matmul_weight_types(quantised["u8"]) == {np.dtype(np.uint8)}

    pixels = plain_inputs(str(tiny_model)).pixels(
        [decode_image(make_image(seed, size=(320, 240))) for seed in range(16)])
    reference = image_vectors(exported, pixels)
    cosine = {weights: float(np.sum(image_vectors(model, pixels) * reference, axis=1).min())
              for weights, model in quantised.items()}
    assert all(0.99 <= value < 1.0 for value in cosine.values()), cosine
    if int8_weight_type() == "u8":  # this CPU saturates int8 products: uint8 must do better
        assert cosine["u8"] > cosine["s8"], cosine


def test_exports_and_vectors_of_each_weight_type_are_kept_apart(
        monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """A store shared by machines with and without VNNI holds both quantisations side by side;
    signed keys stay as they were, so existing exports and vectors are still found."""
    int8 = settings.replace(backend="onnx-int8")
    keys = {}
    for weights in ("s8", "u8"):
        monkeypatch.setattr(onnx_backend, "int8_weight_type", lambda weights=weights: weights)
        keys[weights] = (onnx_backend.export_key(settings.model, "onnx-int8", "image"),
                         vector_tag(int8), onnx_backend.export_key(settings.model, "onnx", "image"))
    assert keys["s8"][0] != keys["u8"][0] and keys["s8"][1] != keys["u8"][1]
    assert "-onnx-int8-opset" in keys["s8"][0] and "-onnx-int8-u8-opset" in keys["u8"][0]
    assert keys["s8"][1].endswith("-onnx-int8") and keys["u8"][1].endswith("-onnx-int8-u8")
    assert keys["s8"][2] == keys["u8"][2], "the fp32 export is the same on every CPU"
