"""The ``sim-pipeline`` command: ``score`` a CSV, ``fetch`` ahead, one ``stage``, ``results``.

``stage`` is how a Kubernetes pod (or any other runner) executes one stage on one chunk:
``sim-pipeline stage embed-images --run-id RUN --chunk 3``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sim_pipeline.core.config import DEVICES, PRECISIONS, Settings, load_settings, user_settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.layout import STAGES
from sim_pipeline.results.cli import register as register_results
from sim_pipeline.stages.embed.native_memory import limit_malloc_arenas

SETTING_HELP = {
    "model": "hub id or folder saved by save_pretrained",
    "store": "object store: a folder or s3://bucket/prefix",
    "database_url": "SQLAlchemy URL of the results database",
    "fetch_timeout": "seconds allowed per image",
    "run_id": "default: derived from the input's content",
    "allow_hosts": "host[:port],... exempt from the private-address guard",
    "fetch_per_host": "at most this many requests to one host at a time",
    "fetch_retries": "retries after a connection error, 408, 429 or 5xx (with backoff)",
    "max_pixels": "refuse larger images (width x height) before decoding them",
    "refetch_errors": "fetch again URLs whose cached fetch failed (after changing limits)",
    "fetch_processes": "0: one per CPU core, for chunks of 1,000+ URLs",
    "user_agent": "sent with every image request",
}
SETTING_CHOICES = {"device": DEVICES, "precision": PRECISIONS}


def _settings_flags() -> argparse.ArgumentParser:
    """One flag per ``Settings`` field (``--batch-size``...); each also reads its env var."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each also read from SIM_PIPELINE_<NAME>)")
    for f in user_settings():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action="store_const", const=True,
                               help=SETTING_HELP.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(flag, type=kind, choices=SETTING_CHOICES.get(f.name),
                           help=SETTING_HELP.get(f.name))
    return parent


def settings_from(args: argparse.Namespace) -> Settings:
    names = {f.name for f in user_settings()}
    return load_settings({k: v for k, v in vars(args).items() if k in names})


def cmd_score(args: argparse.Namespace) -> int:
    from sim_pipeline.runners.pipeline import score_csv

    summary = score_csv(args.input, settings_from(args), args.output, progress=not args.quiet)
    print(summary.render())
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from sim_pipeline.runners.pipeline import fetch_csv

    print(fetch_csv(args.input, settings_from(args), progress=not args.quiet).render_fetch())
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from sim_pipeline.runners import dispatch as stages

    settings = settings_from(args)
    result = stages.run_stage(args.name, settings, input_path=args.input, chunk=args.chunk,
                              output=args.output)
    print(json.dumps(result, sort_keys=True))
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

    fetch = commands.add_parser("fetch", parents=[flags],
                                help="plan and fetch only: warm the image cache")
    fetch.add_argument("input", help="CSV of image URLs and captions")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(handler=cmd_fetch)

    stage = commands.add_parser("stage", parents=[flags], help="run one stage of a run")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--input", help="the CSV (plan only)")
    stage.add_argument("--chunk", type=int, help="chunk index (per-chunk stages)")
    stage.add_argument("--output", help="scored CSV path (finalize only)")
    stage.set_defaults(handler=cmd_stage)

    register_results(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()
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
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
