"""Embedding cache: a second file repeating 90% of the first file's pairs, side by side.

The first file is N pairs over M distinct ~50 KB JPEGs (by default one image per pair), all new;
the second keeps 90% of those pairs (same image bytes, same captions) and brings 10% new ones.
Both are planned and fetched into one store first; then, with both towers already loaded
(importing and loading are not inference), the embed-images and embed-texts stages run over each
file's chunks in turn, timed. Prints each file's inference time, the vectors it had to compute,
and the ratio. Goal: the second costs about 10% of the first's inference time. Random ViT-B/32
weights: speed only.

    .venv/bin/python -m bench.cache [--pairs 1000] [--images 1000] [--repeated 0.9]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from bench.common import BENCH_DIR, fresh_folder, serve_folder, vit_b32_checkpoint, write_images
from sim_pipeline.core.config import Settings
from sim_pipeline.core.store import open_store
from sim_pipeline.runners.pipeline import fetch_csv
from sim_pipeline.stages.embed.images import embed_images_chunk
from sim_pipeline.stages.embed.model import load_encoder, resolved_precision
from sim_pipeline.stages.embed.texts import embed_texts_chunk
from sim_pipeline.stages.plan import load_plan


def write_file(path: Path, pairs: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        writer.writerows(pairs)


def two_files(base_url: str, names: list[str], pairs: int, images: int,
              repeated: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The first file over ``images`` images; the second repeats its first ``repeated`` share
    and fills the rest with pairs over images and captions the first never had."""
    def pair(i: int, image: int) -> tuple[str, str]:
        return f"{base_url}/{names[image]}", f"a photo of scene number {i} with colourful shapes"

    first = [pair(i, i % images) for i in range(pairs)]
    kept = round(pairs * repeated)
    fresh = [pair(pairs + i, images + i % (len(names) - images)) for i in range(pairs - kept)]
    return first, first[:kept] + fresh


def inference(settings: Settings, run_id: str) -> tuple[float, int, int]:
    """Seconds of the two embed stages over the run's chunks, images and captions computed."""
    store = open_store(settings.store)
    started, images, captions = time.perf_counter(), 0, 0
    for chunk in load_plan(store, run_id).chunks:
        images += embed_images_chunk(chunk, store, settings).computed
        captions += embed_texts_chunk(chunk, store, settings).computed
    return time.perf_counter() - started, images, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1000, help="distinct images of the first")
    parser.add_argument("--repeated", type=float, default=0.9)
    args = parser.parse_args()

    folder = BENCH_DIR / "images-640"
    extra = args.pairs - round(args.pairs * args.repeated)
    names = write_images(folder, args.images + max(extra, 1))
    server, base_url = serve_folder(folder)
    work = fresh_folder("cache")
    settings = Settings(model=str(vit_b32_checkpoint()), store=str(work / "store"),
                        allow_hosts=base_url.removeprefix("http://"))
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, then a file repeating "
          f"{args.repeated:.0%} of them; {os.cpu_count()} CPUs, model: random ViT-B/32, "
          f"precision {resolved_precision(settings.device, settings.precision, settings.model)}")
    files = two_files(base_url, names, args.pairs, args.images, args.repeated)
    for run_id, pairs in zip(("first", "second"), files, strict=True):
        write_file(work / f"{run_id}.csv", pairs)
        fetch_csv(work / f"{run_id}.csv", settings, progress=False, run_id=run_id)
    server.shutdown()
    for tower in ("image", "text"):  # loaded once, outside the timings
        load_encoder(settings.model, settings.device, settings.precision, tower)

    seconds = {}
    for run_id in ("first", "second"):
        seconds[run_id], images, captions = inference(settings, run_id)
        print(f"{run_id:6s} file: inference {seconds[run_id]:6.2f} s, {images} images and "
              f"{captions} captions embedded")
    print(f"second / first inference time: {seconds['second'] / seconds['first']:.1%}")


if __name__ == "__main__":
    main()
