"""With SIM_PIPELINE_EXECUTION=kubernetes the GPU stages become pods; their spec, without a cluster.

The pod runs the library's own CLI on one chunk, asks for and is limited to one GPU, and reads the
store and database credentials from a Kubernetes Secret; everything else comes from
SIM_PIPELINE_POD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_helpers import airflow_env, helper

RUN_ID = "scheduled__2025-01-01T02:00:00+00:00"
CHUNK = {"run_id": RUN_ID, "input_digest": "0123456789abcdef", "index": 2, "first_row": 20000,
         "rows": 10000}
POD = {"image": "registry.example.com/sim-pipeline:1.2.3", "namespace": "scoring",
       "secret": "sim-pipeline-credentials", "service_account": "scorer",
       "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
       "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
       "env": {"SIM_PIPELINE_BATCH_SIZE": "256"}}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = airflow_env(tmp_path_factory.mktemp("airflow-home"), {
        "SIM_PIPELINE_EXECUTION": "kubernetes", "SIM_PIPELINE_POD": json.dumps(POD),
        "SIM_PIPELINE_STORE": "s3://scores/store", "SIM_PIPELINE_MODEL": "not-the-run's-model",
        "SIM_PIPELINE_PRECISION": "fp16"})
    return helper("pod", {"stage": "embed-images", "chunk": CHUNK,
                          "model": "openai/clip-vit-large-patch14"}, env)


def container(rendered: dict[str, Any]) -> dict[str, Any]:
    (main,) = rendered["pod"]["spec"]["containers"]
    return main


def test_the_pod_runs_the_library_cli_on_one_chunk(rendered: dict[str, Any]) -> None:
    main = container(rendered)
    assert main["image"] == POD["image"]
    assert main["command"] == ["sim-pipeline", "stage", "embed-images"]
    # Store, model and precision as the workers that join the embeddings see them; the run's
    # model param wins over SIM_PIPELINE_MODEL.
    assert main["args"] == ["--run-id", RUN_ID, "--chunk", "2", "--store", "s3://scores/store",
                            "--model", "openai/clip-vit-large-patch14", "--precision", "fp16"]
    assert {"name": "SIM_PIPELINE_BATCH_SIZE", "value": "256"} in main["env"]


def test_the_pod_requests_and_is_limited_to_one_gpu(rendered: dict[str, Any]) -> None:
    resources = container(rendered)["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}


def test_credentials_come_from_a_kubernetes_secret(rendered: dict[str, Any]) -> None:
    assert container(rendered)["envFrom"] == [{"secretRef": {"name": POD["secret"]}}]
    assert not any("PASSWORD" in e["name"] or "SECRET" in e["name"]
                   for e in container(rendered).get("env", []))


def test_placement_comes_from_the_pod_settings(rendered: dict[str, Any]) -> None:
    pod = rendered["pod"]
    assert pod["metadata"]["namespace"] == "scoring"
    assert pod["metadata"]["labels"]["app"] == "sim-pipeline"
    assert pod["spec"]["nodeSelector"] == POD["node_selector"]
    assert pod["spec"]["tolerations"] == POD["tolerations"]
    assert pod["spec"]["serviceAccountName"] == "scorer"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_only_the_embedding_stages_become_pods_in_the_gpu_pool(rendered: dict[str, Any]) -> None:
    tasks = rendered["bag"]["tasks"]
    assert rendered["bag"]["import_errors"] == {}
    images, texts = "score_chunk.embed_images", "score_chunk.embed_texts"
    assert {t for t, info in tasks.items() if info["operator"] == "StagePodOperator"} == \
        {images, texts}
    assert tasks[images]["pool"] == tasks[texts]["pool"] == "gpu"
    assert tasks[images]["mapped"] and tasks[texts]["mapped"]  # one pod per chunk
    assert tasks[images]["map_index_template"] == "{{ chunk_label(task.chunk) }}"
    assert tasks["score_chunk.join_score"]["upstream"] == ["plan_chunks", images, texts]
    assert rendered["bag"]["heavy_modules"] == []


def test_unknown_pod_settings_are_refused(tmp_path: Path) -> None:
    env = airflow_env(tmp_path, {"SIM_PIPELINE_EXECUTION": "kubernetes",
                                 "SIM_PIPELINE_POD": json.dumps({"gpus": 2})})
    bag = helper("dagbag", None, env)
    assert "SIM_PIPELINE_POD must be a JSON object" in next(iter(bag["import_errors"].values()))
