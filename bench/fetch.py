"""Fetch-stage throughput: N distinct ~50 KB JPEGs from a local server, ours vs img2dataset.

The server runs in its own process on 127.0.0.1 (asyncio, keep-alive, images held in memory), so
it does not share the fetcher's interpreter. Our side is the real fetch stage (``fetch_chunk``:
SSRF guard, caps, sniffing, header check, sha256, atomic store writes) into a fresh local store.
When img2dataset is installed (on PATH, or ``--img2dataset PATH`` / ``$IMG2DATASET`` naming its
executable), it downloads the same URL list (files output, no resize, no re-encoding) and the
ratio is printed. Every request goes to loopback: the server's port is the only allowed host,
and img2dataset runs with a dead loopback proxy for anything that is not 127.0.0.1.

    .venv/bin/python -m bench.fetch [--images 5000] [--concurrency 64] [--img2dataset PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BENCH_DIR, write_images

IMAGE_SIZE = (424, 318)  # ~50 KB as a quality-90 JPEG
RESPONSE_HEAD = ("HTTP/1.1 {status}\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n"
                 "\r\n")


class ImageProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 GET with keep-alive: enough for the two clients measured here."""

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images, self.buffer = images, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            body = self.images.get(path.rsplit("/", 1)[-1])
            status = "200 OK" if body is not None else "404 Not Found"
            body = body if body is not None else b""
            self.transport.write(
                RESPONSE_HEAD.format(status=status, length=len(body)).encode() + body)
            closing = request_line.endswith("HTTP/1.0") or any(
                line.lower().replace(" ", "") == "connection:close" for line in header_lines)
            if closing:
                self.transport.close()
                return


def serve(folder: Path) -> None:
    """The server process: load every image, print the port, serve until killed."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    images = {p.name: p.read_bytes() for p in folder.glob("*.jpg")}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ImageProtocol(images), "127.0.0.1", 0,
                                          backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        parent_gone = asyncio.Event()  # stdin closes when the benchmark exits, however it exits
        loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 1024)
                        or parent_gone.set())
        await parent_gone.wait()
        server.close()

    asyncio.run(main())


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "bench.fetch", "--serve", str(folder)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}"


def run_ours(urls: list[str], base: str, concurrency: int, folder: Path) -> tuple[float, dict]:
    """The real fetch stage over one chunk holding every URL; returns (seconds, stats)."""
    from sim_pipeline.core.config import Settings
    from sim_pipeline.core.store import LocalStore
    from sim_pipeline.stages.fetch.chunk import fetch_chunk
    from sim_pipeline.stages.plan import normalise_row, write_chunks

    store = LocalStore(folder)
    rows = [normalise_row(i, url, "a caption", [url, "a caption"]) for i, url in enumerate(urls)]
    (chunk,) = write_chunks(store, "bench", "fetch", rows, len(rows))
    settings = Settings(store=str(folder), allow_hosts=base.removeprefix("http://"),
                        fetch_concurrency=concurrency, fetch_per_host=concurrency,
                        fetch_timeout=30.0)
    started = time.perf_counter()
    stats = fetch_chunk(chunk, store, settings)
    return time.perf_counter() - started, stats.to_dict()


def run_img2dataset(executable: str, urls: list[str], processes: int, threads: int,
                    folder: Path) -> tuple[float, float, int]:
    """img2dataset on the same URLs (files, no resize, no re-encoding, no EXIF): returns its
    whole-process seconds, the seconds of its download phase (first shard start to last shard
    end, from its own stats files: leaves out its ~3-5 s start-up) and the images it saved."""
    folder.mkdir(parents=True)
    url_list, output = folder / "urls.txt", folder / "out"
    url_list.write_text("\n".join(urls) + "\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           # Anything but 127.0.0.1 would go to a dead loopback proxy, never off the machine.
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    command = [executable, "--url_list", str(url_list), "--input_format", "txt",
               "--output_format", "files", "--output_folder", str(output),
               "--resize_mode", "no", "--disable_all_reencoding", "True",
               "--extract_exif", "False", "--retries", "0", "--timeout", "30",
               "--processes_count", str(processes), "--thread_count", str(threads),
               "--number_sample_per_shard", str(math.ceil(len(urls) / processes))]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    shards = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
    phase = max(s["end_time"] for s in shards) - min(s["start_time"] for s in shards)
    return seconds, phase, sum(s.get("successes", 0) for s in shards)


def find_img2dataset(given: str | None) -> str | None:
    return given or os.environ.get("IMG2DATASET") or shutil.which("img2dataset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs; medians shown")
    parser.add_argument("--img2dataset", help="img2dataset executable (e.g. in another venv)")
    parser.add_argument("--i2d-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--i2d-threads", type=int, default=32,
                        help="its best of 32/64/256 (its default) on a 2-core machine")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return

    folder = BENCH_DIR / "fetch-images-50kb"
    names = write_images(folder, args.images, size=IMAGE_SIZE)
    megabytes = sum((folder / n).stat().st_size for n in names) / 1e6
    executable = find_img2dataset(args.img2dataset)
    server, base = start_server(folder)
    # Outputs stay until the end: on ext4, files created within a minute or more of a mass
    # delete are slow to allocate, which would penalise whichever tool ran next.
    outputs = Path(tempfile.mkdtemp(prefix="fetch-bench-", dir=BENCH_DIR))
    ours: list[float] = []
    theirs: list[tuple[float, float]] = []
    try:
        urls = [f"{base}/{name}" for name in names]
        print(f"{len(urls)} images, {megabytes:.1f} MB ({megabytes * 1e3 / len(urls):.0f} KB "
              f"each) from {base}, {os.cpu_count()} cores")
        for _ in range(args.repeat):
            seconds, stats = run_ours(urls, base, args.concurrency, outputs / f"ours-{len(ours)}")
            ours.append(stats["ok"] / seconds)
            print(f"  sim-pipeline  {ours[-1]:6.0f} images/s  {megabytes / seconds:5.1f} MB/s  "
                  f"({stats['ok']} ok in {seconds:.2f} s; p50 {stats['latency_p50_s']} s, "
                  f"p95 {stats['latency_p95_s']} s)")
            if executable:
                whole, phase, saved = run_img2dataset(executable, urls, args.i2d_processes,
                                                      args.i2d_threads,
                                                      outputs / f"i2d-{len(theirs)}")
                theirs.append((saved / whole, saved / phase))
                print(f"  img2dataset   {theirs[-1][1]:6.0f} images/s  "
                      f"{megabytes / phase:5.1f} MB/s  ({saved} ok: download phase "
                      f"{phase:.2f} s; whole process {whole:.2f} s = {theirs[-1][0]:.0f}/s)")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(outputs)
    print(f"sim-pipeline  median {statistics.median(ours):.0f} images/s "
          f"({statistics.median(ours) * megabytes / len(names):.1f} MB/s), fetch stage "
          f"with {args.concurrency} connections")
    if not theirs:
        print("img2dataset   not installed (pass --img2dataset PATH to compare)")
        return
    phase_rate = statistics.median(r[1] for r in theirs)
    whole_rate = statistics.median(r[0] for r in theirs)
    print(f"img2dataset   median {phase_rate:.0f} images/s in its download phase, "
          f"{whole_rate:.0f} images/s as a whole process ({args.i2d_processes} processes x "
          f"{args.i2d_threads} threads)")
    print(f"ratio         {statistics.median(ours) / phase_rate:.2f}x its download phase, "
          f"{statistics.median(ours) / whole_rate:.2f}x its whole process")


if __name__ == "__main__":
    main()
