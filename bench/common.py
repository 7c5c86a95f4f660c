"""Shared pieces for the benchmarks: synthetic images, a local image server, RSS, the model."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from sim_pipeline.devtools.local_http import QueueingHTTPServer

BENCH_DIR = Path(os.environ.get("SIM_BENCH_DIR", "/tmp/sim-pipeline-bench"))


def jpeg_bytes(seed: int, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients plus noise, ~50 KB at 640x480."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5) + c * 60) % 256
                     for c in range(3)], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_images(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """``count`` distinct JPEGs in ``folder`` (kept between runs); returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{i:06d}.jpg"
        if not (folder / name).exists():
            (folder / name).write_bytes(jpeg_bytes(i, size))
        names.append(name)
    return names


def write_pairs(path: Path, base_url: str, names: list[str], pairs: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for i in range(pairs):
            writer.writerow([f"{base_url}/{names[i % len(names)]}",
                             f"a photo of scene number {i} with some colourful shapes"])


def fresh_folder(name: str) -> Path:
    """``BENCH_DIR / name``, emptied: whatever an earlier run left there is removed first."""
    folder = BENCH_DIR / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) from a background thread."""
    server = QueueingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def vit_b32_checkpoint() -> Path:
    """Random weights of the real ViT-B/32 shape: speed does not depend on weight values.

    ``SIM_BENCH_MODEL_SHAPE=tiny`` swaps in a tiny model, for smoke-testing the scripts.
    """
    return random_checkpoint(os.environ.get("SIM_BENCH_MODEL_SHAPE", "vit-b-32"))


def random_checkpoint(shape: str) -> Path:
    """A random-weight CLIP of ``shape`` ("tiny" or "vit-b-32"), built once under BENCH_DIR."""
    from sim_pipeline.devtools.random_model import build_random_clip

    path = BENCH_DIR / f"clip-{shape}-random"
    if not (path / "config.json").exists():
        build_random_clip(path, shape=shape)
    return path


def small_images(count: int) -> tuple[ThreadingHTTPServer, str, list[str]]:
    """``count`` 320x240 JPEGs served on 127.0.0.1: the server, its base URL, the names."""
    folder = BENCH_DIR / "images-320"
    names = write_images(folder, count, size=(320, 240))
    server, base_url = serve_folder(folder)
    return server, base_url, names


def served_pairs(work_name: str, images: int, pairs: int) -> tuple[
        ThreadingHTTPServer, str, Path, Path]:
    """``pairs`` rows over ``images`` distinct 640x480 JPEGs served from 127.0.0.1, written to
    ``pairs.csv`` in a fresh work folder: ``(server, base URL, work folder, CSV)``."""
    folder = BENCH_DIR / "images-640"
    names = write_images(folder, images)
    server, base_url = serve_folder(folder)
    work = fresh_folder(work_name)
    write_pairs(work / "pairs.csv", base_url, names, pairs)
    return server, base_url, work, work / "pairs.csv"


def start_serve(folder: Path, model: Path, database_url: str, allow_hosts: str,
                *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``sim-pipeline serve`` on a free loopback port over ``folder/store``, logging to
    ``folder/serve.log``; returns once /readyz answers (the model is loaded): process, base URL."""
    port = free_port()
    command = [sys.executable, "-m", "sim_pipeline.cli", "serve", "--port", str(port),
               "--model", str(model), "--store", str(folder / "store"), "--database-url",
               database_url, "--allow-hosts", allow_hosts, *extra]
    with (folder / "serve.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the service did not start; see {folder / 'serve.log'}")
