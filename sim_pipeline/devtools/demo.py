"""`make demo`: the whole pipeline on this machine, offline, in about a minute.

It builds a random-weight CLIP (no model hub needed), draws a few dozen images and serves them on
127.0.0.1, writes a CSV of good rows and of each common per-row error, scores it with the
`sim-pipeline` command (results in SQLite under the output folder) and prints where everything
went. The weights are random, so every similarity it prints is meaningless: the demo shows the
pipeline working, not a model judging captions.

    python -m sim_pipeline.devtools.demo [--csv examples/pairs.csv] [--out .sim-pipeline/demo]
        [--port 8737]
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

from PIL import Image, ImageDraw

from sim_pipeline.devtools.local_http import QueueingHTTPServer
from sim_pipeline.devtools.random_model import build_random_clip

# A fixed default port keeps examples/pairs.csv the same on every run.
DEFAULT_PORT = 8737
MEANINGLESS = ("The model has RANDOM weights: every similarity here is meaningless. "
               "Score real pairs with a real model (--model openai/clip-vit-base-patch32).")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 30), "purple": (140, 60, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    """One 128x128 picture of a single shape: deterministic, so reruns hit the cache."""
    image = Image.new("RGB", (128, 128), background)
    pen = ImageDraw.Draw(image)
    box = (24, 24, 104, 104)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(64, 20), (108, 104), (20, 104)], fill=colour)
    return image


def write_images(folder: Path) -> list[tuple[str, str]]:
    """Every shape in every colour on every background; returns (file name, caption) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for shape in SHAPES:
        for colour_name, colour in COLOURS.items():
            for background_name, background in BACKGROUNDS.items():
                name = f"{colour_name}-{shape}-on-{background_name}.jpg"
                draw(shape, colour, background).save(folder / name, quality=90)
                article = "an" if colour_name[0] in "aeiou" else "a"
                pictures.append((name, f"{article} {colour_name} {shape} on a {background_name} "
                                       "background"))
    # Common ways a URL goes wrong, served for real: an HTML page and a cut-off JPEG.
    (folder / "not-an-image.jpg").write_bytes(b"<!doctype html><html><body>Sign in</body></html>")
    (folder / "truncated.jpg").write_bytes((folder / pictures[0][0]).read_bytes()[:400])
    return pictures


def error_rows(base: str, first_good: str) -> list[tuple[str, str, str]]:
    """(url, caption, the error code the row ends with): one row per common mistake."""
    return [
        (f"{base}/images/deleted-last-week.jpg", "a photo that was taken down", "http_404"),
        (f"{base}/images/not-an-image.jpg", "a login page served instead", "not_an_image"),
        (f"{base}/images/truncated.jpg", "an upload cut short", "decode_error"),
        ("www.example.com/cat.jpg", "a URL without http://", "invalid_url"),
        ("ftp://ftp.example.com/cat.jpg", "a URL over FTP", "unsupported_scheme"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata address",
         "blocked_address"),
        (first_good, "", "missing_caption"),
    ]


def write_pairs(path: Path, base: str, pictures: list[tuple[str, str]]) -> int:
    """The demo's input: good rows, then the error rows; returns the number of rows.

    The third column, ``expected_error``, is only a note for the reader: the pipeline ignores it
    and copies it, like any extra column, into the scored CSV.
    """
    rows = [(f"{base}/images/{name}", caption, "") for name, caption in pictures]
    rows += error_rows(base, rows[0][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_url", "caption", "expected_error"])
        writer.writerows(rows)
    return len(rows)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(folder: Path, port: int) -> Iterator[int]:
    """Serve ``folder`` on 127.0.0.1 from a thread; yields the port actually bound."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        server = QueueingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise SystemExit(f"demo: port {port} on 127.0.0.1 is taken ({error.strerror}): "
                         "pass --port with a free one, or --port 0 for any") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def score(pairs: Path, out: Path, model: Path, port: int) -> int:
    """Run the real `sim-pipeline score` command on the CSV, printing what it prints."""
    command = ["score", str(pairs), "--quiet", "--model", str(model),
               "--store", str(out / "store"), "--database-url", f"sqlite:///{out / 'results.db'}",
               "--output", str(out / "pairs_scored.csv"), "--device", "cpu",
               "--allow-hosts", f"127.0.0.1:{port}"]
    print("$ sim-pipeline " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing leaves this machine
    return subprocess.call([sys.executable, "-m", "sim_pipeline.cli", *command], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Paths are relative to the current folder (`make demo` runs in the checkout's root), so
    # what the demo prints is what a user would type.
    parser.add_argument("--csv", type=Path, default=Path("examples/pairs.csv"),
                        help="where to write the demo's input CSV")
    parser.add_argument("--out", type=Path, default=Path(".sim-pipeline/demo"),
                        help="images, object store, results.db and the scored CSV")
    parser.add_argument("--model", type=Path, default=Path(".sim-pipeline/random-clip"),
                        help="random-weight CLIP folder (built when missing)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="loopback port for the images (0: any free port)")
    args = parser.parse_args(argv)

    print(f"demo: {MEANINGLESS}")
    if not (args.model / "config.json").exists():
        print(f"demo: building a random-weight CLIP in {args.model}")
        build_random_clip(args.model, shape="tiny")
    pictures = write_images(args.out / "images")
    with serve(args.out, args.port) as port:
        rows = write_pairs(args.csv, f"http://127.0.0.1:{port}", pictures)
        print(f"demo: {len(pictures)} images on http://127.0.0.1:{port}/images/; "
              f"{rows} rows ({rows - len(pictures)} with a common mistake) in {args.csv}")
        status = score(args.csv, args.out, args.model, port)
    if status != 0:
        return status
    print(f"demo: open the report: {args.out / 'pairs_scored_report.html'}")
    print(f"demo: query the results: sim-pipeline results runs "
          f"--database-url sqlite:///{args.out / 'results.db'}")
    print(f"demo: {MEANINGLESS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
