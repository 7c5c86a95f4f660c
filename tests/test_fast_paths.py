"""Speed features that must not change results: precision choice, bf16, caching, lazy imports."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sim_pipeline.core.config import Settings
from sim_pipeline.runners.pipeline import score_csv
from sim_pipeline.stages.embed.model import (
    Encoder,
    cpu_supports_bf16,
    load_encoder,
    resolve_precision,
)
from tests.conftest import ImageServer, make_image
from tests.pairs import Case, serve_good_images, write_cases


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("flags\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("flags\t: fpu sse avx2\n")
    assert cpu_supports_bf16(with_bf16) and not cpu_supports_bf16(without)
    assert not cpu_supports_bf16(tmp_path / "missing")
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("auto", "mps") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_supports_bf16() else "fp32")


def test_bf16_embeddings_stay_close_to_fp32(tiny_model: Path) -> None:
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(make_image(seed, size=(320, 240)))) for seed in range(8)]
    texts = [f"a photo of thing number {i} on a table" for i in range(8)]
    for tower, encode in (("image", lambda e: e.encode_images(images)),
                          ("text", lambda e: e.encode_texts(texts))):
        fp32 = encode(load_encoder(str(tiny_model), "cpu", "fp32", tower))
        bf16 = encode(load_encoder(str(tiny_model), "cpu", "bf16", tower))
        cosine = np.sum(fp32 * bf16, axis=1)
        assert cosine.min() >= 0.999, (tower, cosine.min())
        assert not np.array_equal(fp32, bf16), "bf16 really ran"


def test_padding_to_the_longest_caption_changes_no_embedding(tiny_model: Path) -> None:
    encoder = load_encoder(str(tiny_model), "cpu", "fp32", "text")
    texts = ["a cat", "a much longer caption about a dog running on the beach at sunset"]
    tokens = encoder.processor.tokenizer(texts, padding="max_length", max_length=77,
                                         return_tensors="pt")
    full = encoder._encode(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    np.testing.assert_allclose(encoder.encode_texts(texts), full, atol=1e-5)


def test_known_pairs_cost_no_inference_in_a_later_file(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    urls = serve_good_images(image_server, 12, prefix="cache")
    first = [Case(u, f"caption {i}", None) for i, u in enumerate(urls[:10])]
    second = first[:9] + [Case(urls[10], "caption 10", None), Case(urls[11], "new words", None)]
    encoded = {"images": 0, "texts": 0}
    real_pixels, real_texts = Encoder.encode_pixels, Encoder.encode_texts

    def count_pixels(self, pixels):  # noqa: ANN001, ANN202
        encoded["images"] += len(pixels["pixel_values"])
        return real_pixels(self, pixels)

    def count_texts(self, texts):  # noqa: ANN001, ANN202
        encoded["texts"] += len(texts)
        return real_texts(self, texts)

    monkeypatch.setattr(Encoder, "encode_pixels", count_pixels)
    monkeypatch.setattr(Encoder, "encode_texts", count_texts)
    score_csv(write_cases(tmp_path / "first.csv", first), settings, progress=False)
    assert encoded == {"images": 10, "texts": 10}
    score_csv(write_cases(tmp_path / "second.csv", second), settings, progress=False)
    assert encoded == {"images": 12, "texts": 12}, "only the two new images and captions"


def test_a_fully_cached_rerun_imports_neither_torch_nor_transformers(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    """With the default device and precision (``auto``): on a machine without a GPU the device
    is known without torch, and the vectors' precision from the checkpoint's config.json. Nor
    scipy: the new run's drift report compares two identical distributions."""
    settings = settings.replace(device="auto", precision="auto")
    urls = serve_good_images(image_server, 3, prefix="warm")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a caption", None) for u in urls])
    score_csv(source, settings, progress=False)
    flags = ["--model", settings.model, "--store", settings.store, "--database-url",
             settings.database_url, "--device", "auto", "--precision", "auto",
             "--allow-hosts", settings.allow_hosts, "--quiet"]
    probe = ("import sys; from sim_pipeline.cli import main; code = main(sys.argv[1:]); "
             "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, "
             "'scipy' in sys.modules)")
    for run_id in ([], ["--run-id", "a-new-run"]):  # the same run again, and a new run
        done = subprocess.run([sys.executable, "-c", probe, "score", str(source), *flags,
                               *run_id], capture_output=True, text=True, check=True)
        assert done.stdout.strip().splitlines()[-1] == "0 False False False", run_id


def test_a_changed_checkpoint_is_checked_again(tmp_path: Path, tiny_model: Path) -> None:
    """The remembered model check is keyed by the checkpoint's files: a broken processor saved
    over a checked checkpoint is refused in one sentence, not trusted from the memo."""
    from sim_pipeline.core.errors import UserError
    from sim_pipeline.core.store import LocalStore
    from sim_pipeline.stages.embed.families import checked_family, resolve_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    store = LocalStore(tmp_path / "store")
    assert checked_family(str(model), "torch", store) == "CLIP"
    assert len(list((tmp_path / "store" / "model-checks").iterdir())) == 1
    assert checked_family(str(model), "torch", store) == "CLIP"
    (model / "processor_config.json").unlink()
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    resolve_model.cache_clear()
    with pytest.raises(UserError, match="Could not load|no image processor"):
        checked_family(str(model), "torch", store)


@pytest.mark.parametrize(("backend", "min_cosine"), [("onnx", 0.99999), ("onnx-int8", 0.99)])
def test_onnx_backends_match_torch_fp32(tmp_path: Path, tiny_model: Path, backend: str,
                                        min_cosine: float) -> None:
    from sim_pipeline.stages.embed.onnx_backend import load_onnx_encoder

    images = [Image.open(io.BytesIO(make_image(seed, size=(320, 240)))) for seed in range(6)]
    texts = [f"caption number {i} " + "word " * i for i in range(6)]
    store = str(tmp_path / "store")
    for tower, encode in (("image", lambda e: e.encode_images(images)),
                          ("text", lambda e: e.encode_texts(texts))):
        reference = encode(load_encoder(str(tiny_model), "cpu", "fp32", tower))
        exported = encode(load_onnx_encoder(str(tiny_model), backend, tower, store))
        assert np.sum(reference * exported, axis=1).min() >= min_cosine, tower
    exports = {"onnx": 2, "onnx-int8": 4}[backend]  # int8 keeps the fp32 export beside it
    assert len(list((tmp_path / "store" / "onnx").rglob("*.onnx"))) == exports, "cached"
