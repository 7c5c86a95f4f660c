"""The GPU stages as Kubernetes pods that run the same library code through the CLI.

With ``SIM_PIPELINE_EXECUTION=kubernetes``, ``embed_images`` and ``embed_texts`` run one pod per
chunk: ``sim-pipeline stage embed-images --run-id R --chunk I ...``, with one ``nvidia.com/gpu`` in
requests and limits. ``SIM_PIPELINE_POD`` (an environment variable, see ``sim_airflow.options``), a
JSON object, overrides ``PodSettings``' fields. Credentials reach the pod as env vars from a
Kubernetes Secret (keys such as SIM_PIPELINE_DATABASE_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3), never through Airflow; only the non-secret store URI,
model and precision travel as flags, as the library's ``load_settings`` sees them on the worker.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from sim_airflow.labels import POD_LABEL, task_id
from sim_airflow.options import pod_settings_json
from sim_airflow.pools import GPU_POOL

GPU = "nvidia.com/gpu"


def _gpu_tolerations() -> list[dict[str, str]]:
    return [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]


def _resources() -> dict[str, dict[str, str]]:
    return {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


@dataclass(frozen=True)
class PodSettings:
    """Where and how the GPU pods run; every field can be set in ``SIM_PIPELINE_POD``."""

    image: str = "sim-pipeline:latest"
    namespace: str | None = None
    secret: str = "sim-pipeline"
    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=_gpu_tolerations)
    resources: dict[str, dict[str, str]] = field(default_factory=_resources)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_seconds: int = 600
    # A pod to start from (deploy/kubernetes/airflow/gpu-stage-pod.yaml); the fields above win.
    pod_template_file: str | None = None

    @classmethod
    def from_json(cls, raw: str | None) -> PodSettings:
        values = json.loads(raw) if raw else {}
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"SIM_PIPELINE_POD must be a JSON object with keys among "
                             f"{', '.join(sorted(known))}; got {raw!r}.")
        return cls(**values)

    def container_resources(self) -> k8s.V1ResourceRequirements:
        """The configured resources with exactly one GPU requested and limited."""
        requests = {**self.resources.get("requests", {}), GPU: "1"}
        limits = {**self.resources.get("limits", {}), GPU: "1"}
        return k8s.V1ResourceRequirements(requests=requests, limits=limits)

    def operator_kwargs(self) -> dict[str, Any]:
        return {
            "image": self.image, "namespace": self.namespace,
            "service_account_name": self.service_account,
            "node_selector": self.node_selector,
            "tolerations": [k8s.V1Toleration(**t) for t in self.tolerations],
            "container_resources": self.container_resources(),
            "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(self.env.items())],
            "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=self.secret))],
            "startup_timeout_seconds": self.startup_timeout_seconds,
            "pod_template_file": self.pod_template_file,
        }


# What names a chunk's embeddings in the store: the pod must agree with the workers that join them.
SHARED_SETTINGS = ("store", "model", "precision")


def stage_arguments(chunk: Mapping[str, Any], model: str | None) -> list[str]:
    """The chunk, plus the store, model and precision the Airflow workers use for this run (the
    run's ``model`` param, else their ``SIM_PIPELINE_*`` settings), so pod and workers agree on
    keys. Called on the worker that launches the pod, when the task runs: never at parse time."""
    from sim_pipeline.core.config import load_settings

    settings = load_settings({"model": model or None})
    arguments = ["--run-id", str(chunk["run_id"]), "--chunk", str(chunk["index"])]
    for name in SHARED_SETTINGS:
        arguments += [f"--{name}", str(getattr(settings, name))]
    return arguments


class StagePodOperator(KubernetesPodOperator):
    """One library stage on one chunk in a pod: ``sim-pipeline stage STAGE --run-id R --chunk I``.
    """

    # ``chunk`` is the mapped task group's argument: rendering resolves it to this chunk's dict.
    template_fields = (*KubernetesPodOperator.template_fields, "model", "chunk")

    def __init__(self, *, stage: str, chunk: Mapping[str, Any], model: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("labels", {"app": "sim-pipeline", "stage": stage})
        super().__init__(cmds=["sim-pipeline", "stage", stage], do_xcom_push=False, **kwargs)
        self.stage, self.chunk, self.model = stage, chunk, model

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        # The chunk is known only once the mapped task expands, and the model once params render.
        self.arguments = stage_arguments(self.chunk, self.model)
        return super().build_pod_request_obj(context, dry_run=dry_run)


@dataclass(frozen=True)
class GpuPodStage:
    """Stands in for the in-process task: called in the mapped task group, one pod per chunk."""

    stage: str
    settings: PodSettings

    @property
    def task_id(self) -> str:
        return task_id(self.stage)

    def __call__(self, *, chunk: Any) -> StagePodOperator:
        return StagePodOperator(
            task_id=self.task_id, stage=self.stage, chunk=chunk, model="{{ params.model or '' }}",
            pool=GPU_POOL, map_index_template=POD_LABEL, **self.settings.operator_kwargs())


def gpu_pod(stage: str) -> GpuPodStage:
    """The stage as one pod per chunk, placed as ``SIM_PIPELINE_POD`` says."""
    return GpuPodStage(stage, PodSettings.from_json(pod_settings_json()))
