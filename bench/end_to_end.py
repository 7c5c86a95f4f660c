"""End to end, side by side in one run: the seed-style baseline, our CLI cold, our CLI warm, and
the bare model compute for the same work.

Serves N pairs over M distinct ~50 KB JPEGs from 127.0.0.1 and times each as a whole process
(imports and model loading included), printing pairs/s, ratios, each process's peak RSS, the
cold run's stage breakdown and the modules the warm run imported. Bare compute: the image tower
on ready pixel tensors plus the text tower on the distinct captions, at the precision and backend
the run used. Goals: cold <= 1.1x bare compute; warm (every vector cached, a new run id) <= 5% of
cold, importing neither torch nor transformers. Random ViT-B/32 weights: speed only.
``--precision fp32`` forces fp32 on the run and the bare compute alike: on a CPU with bf16 it
stands in for one without (where ``auto`` picks fp32). ``--repeat N`` adds rounds of cold, warm
and bare compute (fresh store and database each) and prints the medians of the two ratios: one
round on a shared machine moves by 10% and more.

    .venv/bin/python -m bench.end_to_end [--pairs 1000] [--images 800] [--skip-baseline]
                                         [--backend torch|onnx|onnx-int8]
                                         [--precision auto|fp32|bf16] [--repeat N]
"""

from __future__ import annotations

import argparse
import csv
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH_DIR, served_pairs, vit_b32_checkpoint
from sim_pipeline.stages.embed.doctor import cpu_line

RSS_PROBE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")
# The CLI in-process, exiting as the sim-pipeline program does; then its peak RSS (VmHWM: the
# process's own, where ru_maxrss can carry the parent's peak across exec) and which heavy
# modules it imported, on stderr.
CLI_PROBE = ("import sys; from sim_pipeline.cli import exit_without_teardown, main; "
             "rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules]; "
             "print('imported:', ' '.join(heavy) or 'neither torch nor transformers', "
             "file=sys.stderr); "
             "peak = [line.split()[1] for line in open('/proc/self/status') "
             "if line.startswith('VmHWM:')]; "
             "print(peak[0], file=sys.stderr); exit_without_teardown(rc)")


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``command``, run as its own process."""
    seconds, rss, _ = timed_run(command, env, RSS_PROBE)
    return seconds, rss


def timed_run(command: list[str], env: dict[str, str], probe: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and the probe's notes, ``command`` run as its own process
    (``RSS_PROBE`` runs it as a child, ``CLI_PROBE`` runs the CLI in-process)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *command], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stdout}\n{done.stderr}")
    lines = done.stderr.strip().splitlines()
    notes = "\n".join([*(line for line in lines[:-1] if line.startswith("imported:")),
                       *(line for line in done.stdout.splitlines() if line.startswith("int8 "))])
    return seconds, int(lines[-1]) / 1024, notes


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine moves every figure."""
    return "load average " + " ".join(f"{load:.2f}" for load in os.getloadavg())


def stage_seconds(database: Path, run_id: str) -> dict[str, float]:
    """The run's stage timings, summed over its chunks, in the order the stages finished."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT stage, SUM(seconds) FROM stage_timings WHERE run_id = ? "
                            "GROUP BY stage ORDER BY MAX(finished_at)", (run_id,)).fetchall()
    return dict(rows)


def bare_compute(model: str, source: Path, backend: str, batch_size: int,
                 precision: str = "auto") -> tuple[float, str]:
    """Seconds the towers alone need for the run's distinct images and captions, inputs ready
    (decoded, preprocessed, in memory): the floor a cold run is measured against."""
    from sim_pipeline.core.config import Settings
    from sim_pipeline.stages.decode import decode_image
    from sim_pipeline.stages.embed.encoders import encoder_for, vector_tag

    settings = Settings(model=model, backend=backend, batch_size=batch_size, precision=precision)
    with source.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder = BENCH_DIR / "images-640"
    names = sorted({row["url"].rsplit("/", 1)[1] for row in rows})
    captions = sorted({row["caption"] for row in rows}, key=lambda c: (len(c), c))
    images = encoder_for(settings, "image")
    pixels = [images.preprocess([decode_image((folder / name).read_bytes())
                                 for name in names[i:i + batch_size]])
              for i in range(0, len(names), batch_size)]
    images.encode_pixels(pixels[0])  # warm-up: kernels for this shape
    started = time.perf_counter()
    for batch in pixels:
        images.encode_pixels(batch)
    image_seconds = time.perf_counter() - started
    texts = encoder_for(settings, "text")
    texts.encode_texts(captions[:batch_size])
    started = time.perf_counter()
    for i in range(0, len(captions), batch_size):
        texts.encode_texts(captions[i:i + batch_size])
    text_seconds = time.perf_counter() - started
    detail = (f"{len(names)} images {len(names) / image_seconds:.1f}/s, {len(captions)} "
              f"captions {len(captions) / text_seconds:.1f}/s, at {vector_tag(settings)}")
    return image_seconds + text_seconds, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the run's and the bare compute's (torch backend)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of cold, warm and bare compute; prints each and the medians")
    args = parser.parse_args()

    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("end-to-end", args.images, args.pairs)
    database = work / "results.db"
    env = {**os.environ, "SIM_PIPELINE_MODEL": model, "SIM_PIPELINE_STORE": str(work / "store"),
           "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{database}",
           "SIM_PIPELINE_ALLOW_HOSTS": base_url.removeprefix("http://")}
    cli = ["score", str(source), "--quiet", "--backend", args.backend,
           "--batch-size", str(args.batch_size), "--precision", args.precision]
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, model: random "
          f"ViT-B/32 (scores meaningless), backend {args.backend}, precision {args.precision}")
    print(f"{cpu_line()}; {load_average()}")

    if args.backend != "torch":  # once per model and store, as every run after the first finds it
        started = time.perf_counter()
        export = [sys.executable, "-c", "import sys; from sim_pipeline.stages.embed.onnx_backend "
                  "import load_onnx_encoder as load; [load(sys.argv[1], sys.argv[2], tower, "
                  "sys.argv[3]) for tower in ('image', 'text')]", model, args.backend,
                  str(work / "store")]
        subprocess.run(export, env=env, check=True, capture_output=True)
        print(f"ONNX export and quantisation, once per model and store (not in cold): "
              f"{time.perf_counter() - started:.1f} s")

    results = {}
    if not args.skip_baseline:
        baseline = [sys.executable, str(Path(__file__).with_name("seed_baseline.py")), model,
                    str(source), str(work / "baseline.csv")]
        results["baseline (seed design, fp32)"] = timed_run(baseline, env, RSS_PROBE)
    results["sim-pipeline cold"] = timed_run([*cli, "--run-id", "cold"], env, CLI_PROBE)
    results["sim-pipeline warm"] = timed_run([*cli, "--run-id", "warm"], env, CLI_PROBE)
    bare, detail = bare_compute(model, source, args.backend, args.batch_size, args.precision)
    rounds = [(results["sim-pipeline cold"][0], results["sim-pipeline warm"][0], bare)]
    for round_ in range(2, args.repeat + 1):  # fresh store and database, same files
        fresh = {**env, "SIM_PIPELINE_STORE": str(work / f"store-{round_}"),
                 "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{work / f'results-{round_}.db'}"}
        rounds.append((timed_run([*cli, "--run-id", "cold"], fresh, CLI_PROBE)[0],
                       timed_run([*cli, "--run-id", "warm"], fresh, CLI_PROBE)[0],
                       bare_compute(model, source, args.backend, args.batch_size,
                                    args.precision)[0]))
    server.shutdown()

    for name, (seconds, rss, _) in results.items():
        print(f"{name:30s} {seconds:7.1f} s {args.pairs / seconds:8.1f} pairs/s "
              f"peak RSS {rss:6.0f} MB")
    cold = results["sim-pipeline cold"][0]
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds
                       in stage_seconds(database, "cold").items())
    print(f"cold stages (s; embed-texts runs beside fetch-images where worker processes "
          f"fetch): {stages}")
    print(f"bare compute {bare:.1f} s ({detail})")
    print(f"cold / bare compute: x{cold / bare:.2f} (goal <= x1.10)")
    if not args.skip_baseline:
        print(f"cold vs baseline: x{results['baseline (seed design, fp32)'][0] / cold:.2f}")
    warm_imports, *_ = results["sim-pipeline warm"][2].splitlines()
    print(f"warm / cold: {results['sim-pipeline warm'][0] / cold:.1%} (goal <= 5%); warm "
          f"{warm_imports}")
    for line in results["sim-pipeline cold"][2].splitlines()[1:]:
        print(f"cold run's {line}")
    if len(rounds) > 1:
        print_rounds(rounds)
    print(f"at the end: {load_average()}")


def print_rounds(rounds: list[tuple[float, float, float]]) -> None:
    """Each round's cold, warm and bare seconds, and the medians of the two ratios."""
    for number, (cold, warm, bare) in enumerate(rounds, 1):
        print(f"round {number}: cold {cold:.1f} s, warm {warm:.1f} s, bare {bare:.1f} s: "
              f"cold / bare x{cold / bare:.2f}, warm / cold {warm / cold:.1%}")
    print(f"over {len(rounds)} rounds: cold / bare median "
          f"x{statistics.median(c / b for c, _, b in rounds):.2f} (goal <= x1.10), warm / cold "
          f"median {statistics.median(w / c for c, w, _ in rounds):.1%} (goal <= 5%)")


if __name__ == "__main__":
    main()
