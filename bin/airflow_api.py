"""The REST API of a running Airflow api-server, for the benchmarks and tests of the launchers.

No login: both launchers make every visitor an admin (loopback only), so plain requests do.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

DAG_ID = "similarity_scoring"


class AirflowApi:
    """The REST API of a running api-server (no login: the launcher makes everyone an admin)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v2"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        # 120 s: on a busy 2-core machine the api-server once took over 30 s to clear a run
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def run_path(self, run_id: str) -> str:
        return f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def trigger(self, conf: Mapping[str, Any]) -> str:
        run = self.call("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
        return str(run["dag_run_id"])

    def has_dag(self) -> bool:
        try:
            self.call("GET", f"/dags/{DAG_ID}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise
        return True

    def runs(self) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"])

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        path = self.run_path(run_id) + "/taskInstances?limit=1000"
        return list(self.call("GET", path)["task_instances"])

    def clear(self, run_id: str, task_ids: Sequence[str] | None = None) -> None:
        """Clear a run's tasks (all, or these and what follows them), as the UI's Clear does."""
        body: dict[str, Any] = {"dry_run": False, "dag_run_id": run_id, "only_failed": False,
                                "reset_dag_runs": True, "include_downstream": True}
        if task_ids is not None:
            body["task_ids"] = list(task_ids)
        self.call("POST", f"/dags/{DAG_ID}/clearTaskInstances", body)
        state = self.call("GET", self.run_path(run_id))["state"]
        assert state in ("queued", "running"), f"cleared run {run_id} is {state}"

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_for_run(self, run_id: str, timeout: float = 300) -> str:
        """Wait until the run finishes; its final state."""
        final = ("success", "failed")
        self.wait(lambda: self.call("GET", self.run_path(run_id))["state"] in final,
                  f"run {run_id}", timeout)
        return str(self.call("GET", self.run_path(run_id))["state"])


