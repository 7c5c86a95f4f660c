"""The ``sim-pipeline`` command: ``score`` a CSV, run one ``stage`` of a run, build a test model.

``stage`` is how a Kubernetes pod (or any other runner) executes one stage on one chunk:
``sim-pipeline stage embed-images --run-id RUN --chunk 3``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from sim_pipeline.config import DEVICES, PRECISIONS, Settings, load_settings
from sim_pipeline.errors import UserError

STAGES = ("plan", "fetch-images", "embed-images", "embed-texts", "join-score", "finalize")


def _settings_flags() -> argparse.ArgumentParser:
    """One flag per ``Settings`` field; each also reads ``SIM_PIPELINE_<NAME>``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each also read from SIM_PIPELINE_<NAME>)")
    group.add_argument("--model", help="hub id or folder saved by save_pretrained")
    group.add_argument("--store", help="object store: a folder or s3://bucket/prefix")
    group.add_argument("--database-url", help="SQLAlchemy URL of the results database")
    group.add_argument("--device", choices=DEVICES)
    group.add_argument("--precision", choices=PRECISIONS)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--chunk-size", type=int)
    group.add_argument("--fetch-concurrency", type=int)
    group.add_argument("--fetch-timeout", type=float, help="seconds per image")
    group.add_argument("--max-image-bytes", type=int)
    group.add_argument("--run-id", help="default: derived from the input's content")
    group.add_argument("--url-column")
    group.add_argument("--caption-column")
    return parent


def settings_from(args: argparse.Namespace) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return load_settings({k: v for k, v in vars(args).items() if k in names})


def cmd_score(args: argparse.Namespace) -> int:
    from sim_pipeline.pipeline import score_csv

    summary = score_csv(args.input, settings_from(args), args.output, progress=not args.quiet)
    print(summary.render())
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from sim_pipeline import stages

    settings = settings_from(args)
    result = stages.run_stage(args.name, settings, input_path=args.input, chunk=args.chunk,
                              output=args.output)
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_random_model(args: argparse.Namespace) -> int:
    from sim_pipeline.random_model import build_random_clip

    path = build_random_clip(args.dest, shape=args.shape)
    print(f"wrote a random-weight CLIP ({args.shape}) to {path}: its scores are meaningless")
    return 0


def build_parser() -> argparse.ArgumentParser:
    flags = _settings_flags()
    parser = argparse.ArgumentParser(prog="sim-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", parents=[flags], help="score a CSV end to end")
    score.add_argument("input", help="CSV of image URLs and captions")
    score.add_argument("-o", "--output", help="default: <input>_scored.csv beside the input")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(handler=cmd_score)

    stage = commands.add_parser("stage", parents=[flags], help="run one stage of a run")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--input", help="the CSV (plan only)")
    stage.add_argument("--chunk", type=int, help="chunk index (per-chunk stages)")
    stage.add_argument("--output", help="scored CSV path (finalize only)")
    stage.set_defaults(handler=cmd_stage)

    model = commands.add_parser(
        "random-model", help="save a random-weight CLIP for offline trials (meaningless scores)")
    model.add_argument("dest")
    model.add_argument("--shape", choices=("tiny", "vit-b-32"), default="tiny")
    model.set_defaults(handler=cmd_random_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as error:
        print(f"sim-pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sim-pipeline: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130




if __name__ == "__main__":
    sys.exit(main())
