"""With ``SIM_PIPELINE_INFERENCE_URL`` the embed stages send store keys and captions to a running
``sim-pipeline serve`` (sharing the store) and write the same chunk outputs, without torch: the
scores equal the in-process path's, from the CLI and from the Airflow DAG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim_pipeline.core.config import Settings
from tests.airflow_helpers import airflow_env, helper, run_airflow, score_rows, write_pairs
from tests.conftest import ImageServer
from tests.pairs import Case, read_csv, serve_good_images, write_cases
from tests.test_score_cli import score
from tests.test_serve import ROOT, ServeProcess

CAPTIONS = ["a red square", "two dogs in the snow", "plain", "ünïcödé", "x", "a cat"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
            image_server: ImageServer) -> ServeProcess:
    served = ServeProcess(tmp_path_factory.mktemp("served"), tiny_model,
                          image_server.allow_hosts).start()
    yield served
    served.stop()


def similarities(path: Path) -> list[tuple[str, str]]:
    return [(row[-2], row[-1]) for row in read_csv(path)[1:]]


def test_the_cli_scores_through_the_service_without_torch_as_in_process(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        service: ServeProcess) -> None:
    urls = serve_good_images(image_server, len(CAPTIONS), prefix="remote-cli")
    cases = [Case(u, c, None) for u, c in zip(urls, CAPTIONS, strict=True)]
    cases.append(Case(image_server.url("/remote-cli/missing.jpg"), "gone", "http_404"))
    source = write_cases(tmp_path / "pairs.csv", cases)
    flags = ["--quiet", "--model", settings.model, "--store", str(service.store),
             "--database-url", settings.database_url, "--allow-hosts", settings.allow_hosts,
             "--inference-url", service.url(""), "-o", str(tmp_path / "remote.csv")]
    probe = ("import sys; from sim_pipeline.cli import main; code = main(sys.argv[1:]); "
             "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, "score", str(source), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]

    assert score(source, settings, "-o", str(tmp_path / "local.csv")) == 0
    remote, local = similarities(tmp_path / "remote.csv"), similarities(tmp_path / "local.csv")
    assert [e for _, e in remote] == [e for _, e in local] == [""] * len(CAPTIONS) + ["http_404"]
    for (got, _), (want, _) in zip(remote, local, strict=True):
        assert got == want or abs(float(got) - float(want)) <= 1e-4


def test_a_service_with_another_model_stops_the_run_at_plan_time(
        tmp_path: Path, settings: Settings, image_server: ImageServer, service: ServeProcess,
        capsys: pytest.CaptureFixture[str]) -> None:
    (url,) = serve_good_images(image_server, 1, prefix="remote-other")
    source = write_cases(tmp_path / "pairs.csv", [Case(url, "a cat", None)])
    before = image_server.total_requests()
    other = settings.replace(model="another/model", store=str(service.store))
    assert score(source, other, "--inference-url", service.url("")) == 2
    assert "another/model" in capsys.readouterr().err
    assert image_server.total_requests() == before


def test_the_dag_embeds_through_the_service_with_the_same_scores(
        tmp_path: Path, tiny_model: Path, image_server: ImageServer, service: ServeProcess,
        pg_url: str) -> None:
    urls = serve_good_images(image_server, 4, prefix="remote-dag")
    source = write_pairs(tmp_path / "pairs.csv", urls)
    common = {"SIM_PIPELINE_MODEL": str(tiny_model), "SIM_PIPELINE_DATABASE_URL": pg_url,
              "SIM_PIPELINE_DEVICE": "cpu", "SIM_PIPELINE_PRECISION": "fp32",
              "SIM_PIPELINE_ALLOW_HOSTS": image_server.allow_hosts}
    remote_env = airflow_env(tmp_path / "home-remote", {
        **common, "SIM_PIPELINE_STORE": str(service.store),
        "SIM_PIPELINE_INFERENCE_URL": service.url("")})
    local_env = airflow_env(tmp_path / "home-local", {
        **common, "SIM_PIPELINE_STORE": str(tmp_path / "local-store")})
    runs = {}
    for name, env in (("remote", remote_env), ("local", local_env)):
        run_airflow(["db", "migrate"], env)
        done = helper("dag-test", [{"logical_date": "2025-03-01T00:00:00+00:00",
                                    "conf": {"csv_path": str(source),
                                             "output_path": str(tmp_path / f"{name}.csv")}}],
                      env, timeout=600)
        (run,) = done["runs"]
        assert run["state"] == "success", run
        runs[name] = {r["row_number"]: r["similarity"] for r in score_rows(pg_url, run["run_id"])}
    assert runs["remote"].keys() == runs["local"].keys() and len(runs["local"]) == 4
    for row, want in runs["local"].items():
        assert runs["remote"][row] == pytest.approx(want, abs=1e-4)
