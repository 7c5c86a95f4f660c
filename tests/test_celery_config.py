"""The stack's Celery workers import the library once, at start, and never torch.

``bin/stack.py`` (and docker-compose.yaml, by the same names) points ``[celery]
celery_config_options`` at ``sim_airflow.celery_config``; each check runs in a fresh interpreter
under the stack's own environment, the way a worker reads its configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bin import stack as stack_module

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from airflow.providers.celery.executors.celery_executor_utils import get_celery_configuration
from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
config = get_celery_configuration()
for module in config["imports"]:
    __import__(module)
print(json.dumps({
    "imports": list(config["imports"]),
    "airflow_defaults_kept": all(config[k] == v for k, v in DEFAULT_CELERY_CONFIG.items()),
    "broker": config["broker_url"],
    "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules),
}))
"""


def worker_view(tmp_path: Path) -> dict[str, object]:
    """The Celery configuration as a worker of a stack in ``tmp_path`` reads it."""
    cfg = stack_module.StackConfig(str(tmp_path), 8080, stack_module.DEFAULT_ADMIN_URL, 7,
                                   seaweed_ports={"s3": 8333})
    env = stack_module.component_environ(cfg, os.environ, "worker-inference")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "plugins")])
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_workers_preload_the_stages_but_not_torch(tmp_path: Path) -> None:
    view = worker_view(tmp_path)
    assert "sim_pipeline.runners.dispatch" in view["imports"]
    assert "sim_airflow.runs" in view["imports"]
    assert view["heavy"] == []  # forking after torch has started its threads is unsafe


def test_the_rest_of_the_celery_configuration_is_airflows(tmp_path: Path) -> None:
    view = worker_view(tmp_path)
    assert view["airflow_defaults_kept"] is True
    assert view["broker"] == "redis://127.0.0.1:6379/7"
