"""End to end, side by side in one run: the seed-style baseline, our CLI cold, our CLI warm.

Serves N pairs over M distinct ~50 KB JPEGs from 127.0.0.1 and times each as a whole process
(imports and model loading included), printing pairs/s, ratios and each process's peak RSS.
Goals: cold >= 3x the baseline at the default precision; warm <= 5% of cold (a fully cached run
imports neither torch nor transformers); peak RSS under 1 GB. Random ViT-B/32 weights: speed only.

    .venv/bin/python -m bench.end_to_end [--pairs 1000] [--images 800] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import served_pairs, vit_b32_checkpoint

RSS_PROBE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``command``, run as its own process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *command], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    model = str(vit_b32_checkpoint())
    server, base_url, work, source = served_pairs("end-to-end", args.images, args.pairs)
    env = {**os.environ, "SIM_PIPELINE_MODEL": model, "SIM_PIPELINE_STORE": str(work / "store"),
           "SIM_PIPELINE_DATABASE_URL": f"sqlite:///{work / 'results.db'}",
           "SIM_PIPELINE_ALLOW_HOSTS": base_url.removeprefix("http://")}
    cli = [str(Path(sys.executable).with_name("sim-pipeline")), "score", str(source), "--quiet"]
    print(f"{args.pairs} pairs over {args.images} distinct 640x480 JPEGs, "
          f"{os.cpu_count()} CPUs, model: random ViT-B/32")

    results = {}
    if not args.skip_baseline:
        baseline = [sys.executable, str(Path(__file__).with_name("seed_baseline.py")), model,
                    str(source), str(work / "baseline.csv")]
        results["baseline (seed design, fp32)"] = timed_process(baseline, env)
    results["sim-pipeline cold"] = timed_process(cli, env)
    results["sim-pipeline warm"] = timed_process(cli, env)
    server.shutdown()

    for name, (seconds, rss) in results.items():
        print(f"{name:30s} {seconds:7.1f} s {args.pairs / seconds:8.1f} pairs/s "
              f"peak RSS {rss:6.0f} MB")
    cold = results["sim-pipeline cold"][0]
    if not args.skip_baseline:
        print(f"cold vs baseline: x{results['baseline (seed design, fp32)'][0] / cold:.2f}")
    print(f"warm / cold: {results['sim-pipeline warm'][0] / cold:.1%}")


if __name__ == "__main__":
    main()
