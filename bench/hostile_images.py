"""Peak memory with images just under the pixel cap: 1, then N, then M of them in one run.

Decoding is bounded by pixels in flight (not only by count), so the peak must not grow with the
number of huge images. Each run is its own process (the CLI, default settings), measured whole.
The model is a random-weight ViT-B/32 (scores meaningless; the real model's shape and memory).

    .venv/bin/python -m bench.hostile_images [--counts 1 12 40] [--side 7000]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import BENCH_DIR, fresh_folder, serve_folder, vit_b32_checkpoint
from bench.end_to_end import timed_process


def write_huge_images(folder: Path, count: int, side: int) -> list[str]:
    """Smooth gradients (a few MB of JPEG each) of ``side`` x ``side`` pixels, each distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                     np.add.outer(ramp[::-1], ramp) / 2], axis=-1).astype(np.uint8)
    names = []
    for i in range(count):
        name = f"huge-{side}-{i:03d}.jpg"
        if not (folder / name).exists():
            buffer = io.BytesIO()
            Image.fromarray(np.roll(base, i * 37, axis=0)).save(buffer, "JPEG", quality=90)
            (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 12, 40])
    parser.add_argument("--side", type=int, default=7000, help="pixels per side (7000: 49 MP, "
                        "just under the default 50 MP cap)")
    args = parser.parse_args()
    model = vit_b32_checkpoint()
    folder = BENCH_DIR / "huge-images"
    names = write_huge_images(folder, max(args.counts), args.side)
    server, base_url = serve_folder(folder)
    peaks = []
    try:
        for count in args.counts:
            work = fresh_folder(f"hostile-{count}")  # cold: nothing fetched or embedded yet
            source = work / "pairs.csv"
            with source.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["url", "caption"])
                writer.writerows([f"{base_url}/{name}", f"caption {i}"]
                                 for i, name in enumerate(names[:count]))
            command = [str(Path(sys.executable).with_name("sim-pipeline")), "score",
                       str(source), "--quiet", "--model", str(model),
                       "--store", str(work / "store"), "--database-url",
                       f"sqlite:///{work / 'results.db'}", "--allow-hosts",
                       base_url.removeprefix("http://")]
            seconds, peak = timed_process(command, dict(os.environ))
            peaks.append(peak)
            print(f"{count:3d} images of {args.side}x{args.side}: peak RSS {peak:,.0f} MB, "
                  f"{seconds:.1f} s", flush=True)
    finally:
        server.shutdown()
    print(f"peak RSS, most / fewest images: {peaks[-1] / peaks[0]:.2f}x (random weights: "
          "figures are about memory only)")


if __name__ == "__main__":
    sys.exit(main())
