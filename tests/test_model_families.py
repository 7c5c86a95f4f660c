"""Every supported family scores at parity with its own reference computation; anything else is
refused before any image is fetched.

The reference, per family: ``AutoModel`` + ``AutoProcessor``, ``get_image_features`` and
``get_text_features``, with the family's model-card text padding (CLIP: the batch's longest
caption; SigLIP: ``max_length``). The checkpoints are tiny and random: their scores are
meaningless, but they must be the reference's to within 0.001.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from sim_pipeline import score_pairs
from sim_pipeline.core.config import Settings
from sim_pipeline.core.layout import model_tag
from sim_pipeline.devtools.random_model import (
    build_clip_with_default_sub_projection,
    build_random_siglip,
    build_random_siglip2,
)
from sim_pipeline.stages.embed.model import cpu_supports_bf16, resolved_precision
from tests.conftest import ImageServer
from tests.pairs import Case, read_csv, serve_good_images, write_cases
from tests.test_score_cli import score

CAPTIONS = ["a red square", "two dogs playing in the snow", "plain",
            "a very long caption " + "with many words " * 40, "ünïcödé, \"quoted\" text",
            "a cat", "🙂 emoji caption", "x"]


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def siglip2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_siglip2(tmp_path_factory.mktemp("siglip2"))


@pytest.fixture(scope="module")
def clip_disagreeing_dims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip_with_default_sub_projection(tmp_path_factory.mktemp("clip-dims"))


def reference_similarities(model_dir: Path, bodies: list[bytes], captions: list[str]
                           ) -> list[float]:
    """The family's own computation, pair by pair (one caption per call, as a user would)."""
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    siglip = model.config.model_type.startswith("siglip")
    limit = model.config.text_config.max_position_embeddings  # CLIP 77, SigLIP 64
    padding = {"padding": "max_length" if siglip else True, "max_length": limit}
    scores = []
    for body, caption in zip(bodies, captions, strict=True):
        image = Image.open(io.BytesIO(body)).convert("RGB")
        inputs = processor(text=[caption], images=[image], truncation=True, return_tensors="pt",
                           **padding)
        text_keys = ("input_ids", "attention_mask")
        text_inputs = {k: v for k, v in inputs.items() if k in text_keys}
        image_inputs = {k: v for k, v in inputs.items() if k not in text_keys}
        with torch.no_grad():
            image_emb = model.get_image_features(**image_inputs).pooler_output
            text_emb = model.get_text_features(**text_inputs).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb).item()
        scores.append((cosine + 1) / 2)
    return scores


def served_pairs(image_server: ImageServer, prefix: str) -> tuple[list[str], list[bytes]]:
    urls = serve_good_images(image_server, len(CAPTIONS), prefix=prefix)
    bodies = [image_server.routes[u.removeprefix(image_server.url(""))].body for u in urls]
    return urls, bodies


FAMILY_FIXTURES = {"siglip": "siglip_model", "siglip2": "siglip2_model",
                   "clip-disagreeing-dims": "clip_disagreeing_dims"}


@pytest.mark.parametrize("family", sorted(FAMILY_FIXTURES))
@pytest.mark.parametrize(("precision", "tolerance"), [("auto", 1e-3), ("fp32", 1e-3),
                                                      ("bf16", 5e-3)])
def test_the_cli_and_score_pairs_match_the_family_reference(
        family: str, precision: str, tolerance: float, request: pytest.FixtureRequest,
        tmp_path: Path,
        settings: Settings, image_server: ImageServer) -> None:
    model = request.getfixturevalue(FAMILY_FIXTURES[family])
    urls, bodies = served_pairs(image_server, f"family-{family}")
    expected = reference_similarities(model, bodies, CAPTIONS)
    assert len({round(e, 4) for e in expected}) > 3, "distinct pairs should not score alike"
    run = settings.replace(model=str(model), precision=precision)

    source = write_cases(tmp_path / "pairs.csv", [Case(u, c, None) for u, c in
                                                   zip(urls, CAPTIONS, strict=True)])
    assert score(source, run) == 0
    rows = read_csv(tmp_path / "pairs_scored.csv")[1:]
    assert [r[-1] for r in rows] == [""] * len(CAPTIONS)
    for row, want in zip(rows, expected, strict=True):
        assert float(row[-2]) == pytest.approx(want, abs=tolerance)

    api = list(score_pairs(zip(urls, CAPTIONS, strict=True), run.replace(
        store=str(tmp_path / "api-store"))))
    for result, want in zip(api, expected, strict=True):
        assert result.error is None and result.similarity == pytest.approx(want, abs=tolerance)


def test_onnx_scores_a_clip_with_disagreeing_dims_at_parity(
        tmp_path: Path, settings: Settings, clip_disagreeing_dims: Path,
        image_server: ImageServer) -> None:
    urls, bodies = served_pairs(image_server, "family-onnx-clip")
    expected = reference_similarities(clip_disagreeing_dims, bodies, CAPTIONS)
    source = write_cases(tmp_path / "pairs.csv", [Case(u, c, None) for u, c in
                                                   zip(urls, CAPTIONS, strict=True)])
    run = settings.replace(model=str(clip_disagreeing_dims))
    assert score(source, run, "--backend", "onnx") == 0
    rows = read_csv(tmp_path / "pairs_scored.csv")[1:]
    for row, want in zip(rows, expected, strict=True):
        assert float(row[-2]) == pytest.approx(want, abs=1e-3)


def test_onnx_is_refused_for_siglip_before_any_fetch(
        tmp_path: Path, settings: Settings, siglip_model: Path, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    urls, _ = served_pairs(image_server, "family-onnx")
    source = write_cases(tmp_path / "pairs.csv", [Case(urls[0], "a cat", None)])
    before = image_server.total_requests()
    assert score(source, settings.replace(model=str(siglip_model)), "--backend", "onnx") == 2
    err = capsys.readouterr().err
    assert "SIM_PIPELINE_BACKEND=onnx" in err and "SigLIP" in err and "Traceback" not in err
    assert image_server.total_requests() == before


def test_a_model_of_another_family_is_refused_in_one_sentence_before_any_fetch(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig

    other = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(other)
    urls, _ = served_pairs(image_server, "family-bert")
    source = write_cases(tmp_path / "pairs.csv", [Case(urls[0], "a cat", None)])
    before = image_server.total_requests()
    assert score(source, settings.replace(model=str(other))) == 2
    err = capsys.readouterr().err.strip()
    assert "bert checkpoint" in err and "CLIP (CLIPModel)" in err and "SigLIP (SiglipModel)" in err
    assert len(err.splitlines()) == 1 and image_server.total_requests() == before


def test_a_missing_model_folder_stops_the_run_before_any_fetch(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    urls, _ = served_pairs(image_server, "family-missing")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, "a cat", None) for u in urls])
    before = image_server.total_requests()
    assert score(source, settings.replace(model=str(tmp_path / "no-such-model"))) == 2
    err = capsys.readouterr().err
    assert "SIM_PIPELINE_MODEL" in err and "Traceback" not in err
    assert image_server.total_requests() == before


def test_two_models_on_one_csv_give_two_runs_that_never_share_vectors(
        tmp_path: Path, settings: Settings, siglip_model: Path, tiny_model: Path,
        image_server: ImageServer) -> None:
    urls, bodies = served_pairs(image_server, "family-both")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, c, None) for u, c in
                                                   zip(urls, CAPTIONS, strict=True)])
    outputs = {}
    for name, model in (("clip", tiny_model), ("siglip", siglip_model)):
        output = tmp_path / f"{name}.csv"
        assert score(source, settings.replace(model=str(model)), "-o", str(output)) == 0
        outputs[name] = [float(r[-2]) for r in read_csv(output)[1:]]
        expected = reference_similarities(model, bodies, CAPTIONS)
        assert outputs[name] == pytest.approx(expected, abs=1e-3)
    assert outputs["clip"] != outputs["siglip"]
    tags = {p.name for p in (Path(settings.store) / "embeddings").iterdir()}
    assert tags == {model_tag(str(m), "fp32") for m in (tiny_model, siglip_model)}
    assert len(list((Path(settings.store) / "runs").iterdir())) == 2


def test_auto_precision_keeps_narrow_models_in_fp32_and_wide_ones_in_bf16_where_the_cpu_can(
        tiny_model: Path, tmp_path: Path) -> None:
    assert resolved_precision("cpu", "auto", str(tiny_model)) == "fp32"
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text('{"vision_config": {"hidden_size": 768}, '
                                      '"text_config": {"hidden_size": 512}}', encoding="utf-8")
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolved_precision("cpu", "auto", str(wide)) == expected
    assert resolved_precision("cpu", "fp32", str(wide)) == "fp32"


CONTROL_CAPTIONS = ["tab\tand\x07bell\x1bescape", "  spaces around  ", "nul\0inside",
                    "c1\x85\x9c controls", "form\x0cfeed\x7fdel"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_captions_with_control_characters_score_as_the_reference_tokenizes_them(
        family: str, request: pytest.FixtureRequest, tmp_path: Path, settings: Settings,
        tiny_model: Path, image_server: ImageServer) -> None:
    """The model gets the caption exactly as written: replacing control characters (or
    stripping spaces) would score another text than the family's own processor does."""
    model = tiny_model if family == "clip" else request.getfixturevalue("siglip_model")
    urls = serve_good_images(image_server, len(CONTROL_CAPTIONS), prefix=f"controls-{family}")
    bodies = [image_server.routes[u.removeprefix(image_server.url(""))].body for u in urls]
    expected = reference_similarities(model, bodies, CONTROL_CAPTIONS)
    run = settings.replace(model=str(model), precision="fp32")
    source = write_cases(tmp_path / "pairs.csv", [Case(u, c, None) for u, c in
                                                   zip(urls, CONTROL_CAPTIONS, strict=True)])
    assert score(source, run) == 0
    rows = read_csv(tmp_path / "pairs_scored.csv")[1:]
    assert [r[-1] for r in rows] == [""] * len(CONTROL_CAPTIONS)
    for row, want in zip(rows, expected, strict=True):
        assert float(row[-2]) == pytest.approx(want, abs=1e-3), row
