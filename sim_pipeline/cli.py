"""The ``sim-pipeline`` command: ``score`` a CSV, ``fetch`` ahead, one ``stage``, ``results``.

``stage`` is how a Kubernetes pod (or any other runner) executes one stage on one chunk:
``sim-pipeline stage embed-images --run-id RUN --chunk 3``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from sim_pipeline.core.config import (
    DEVICES,
    PRECISIONS,
    Settings,
    api_keys,
    debug_requested,
    flag_of,
    load_settings,
    run_id_given,
    user_settings,
)
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.faults import Terminated, fault_sentence, known_fault, sigterm_stops
from sim_pipeline.core.layout import STAGES
from sim_pipeline.results.cli import register as register_results
from sim_pipeline.spark.command import register as register_spark
from sim_pipeline.stages.embed.native_memory import limit_malloc_arenas

SETTING_CHOICES = {"device": DEVICES, "precision": PRECISIONS}


def _settings_flags() -> argparse.ArgumentParser:
    """One flag per ``Settings`` field (``--batch-size``...); each also reads its env var."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure (also SIM_PIPELINE_DEBUG=1)")
    group = parent.add_argument_group("settings (each also read from SIM_PIPELINE_<NAME>)")
    for f in user_settings():
        if f.type == "bool":
            group.add_argument(flag_of(f.name), action="store_const", const=True,
                               help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(flag_of(f.name), type=kind, choices=SETTING_CHOICES.get(f.name),
                           help=f.metadata["help"])
    return parent


def _add_run_id(command: argparse.ArgumentParser) -> None:
    command.add_argument("--run-id", help="the run's name in the store and the results table "
                         "(also SIM_PIPELINE_RUN_ID; default: derived from the input's content)")


def settings_from(args: argparse.Namespace) -> Settings:
    names = {f.name for f in user_settings()}
    return load_settings({k: v for k, v in vars(args).items() if k in names}, flags=True)


def checked_input(args: argparse.Namespace) -> Settings:
    """The settings, once the input's shape is checked: a file that cannot be planned is
    refused in a second, before the pipeline (database, model) is even imported."""
    from pathlib import Path

    from sim_pipeline.stages.plan import check_input

    settings = settings_from(args)
    check_input(Path(args.input), settings)
    return settings


def run_settings(args: argparse.Namespace, run_id: str | None) -> Settings:
    """The settings of a run; with a run id given, a refused option is recorded as the run's
    failure (in the results database the other flags name), so ``results runs`` shows it."""
    try:
        return settings_from(args) if run_id else checked_input(args)
    except UserError as refused:
        if run_id:
            record_refused(args, run_id, fault_sentence(refused))
        raise


def record_refused(args: argparse.Namespace, run_id: str, sentence: str) -> None:
    """Mark ``run_id`` failed with ``sentence``, reaching the database with only the flags that
    say where it is (and the model the run asked for); best effort: the refusal is printed
    whether or not the database takes it."""
    from contextlib import suppress

    from sim_pipeline.runners.lifecycle import Run

    with suppress(UserError, OSError):  # a refused database setting, or a database away
        settings = load_settings({"database_url": args.database_url, "model": args.model},
                                 flags=True)
        Run.open(settings).fail(run_id, sentence, str(args.input))


def cmd_score(args: argparse.Namespace) -> int:
    run_id = run_id_given(args.run_id)
    settings = run_settings(args, run_id)  # without a run id, the input is checked here
    from sim_pipeline.runners.pipeline import score_csv

    summary = score_csv(args.input, settings, args.output, progress=not args.quiet,
                        run_id=run_id)
    print(summary.render())
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from sim_pipeline.core.store import open_store
    from sim_pipeline.runners.store_verify import verify_store

    store = open_store(settings_from(args).store)
    verdict = verify_store(store, repair=args.repair)
    print(verdict.render(store.uri))
    return 1 if verdict.damaged and not args.repair else 0


def _add_store(commands: argparse._SubParsersAction, flags: argparse.ArgumentParser) -> None:
    store = commands.add_parser("store", help="look after the object store")
    sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    verify = sub.add_parser("verify", parents=[flags], help="check every object against its "
                            "recorded digest (exit 1 when some are damaged)")
    verify.add_argument("--repair", action="store_true",
                        help="remove the damaged objects: the next run recomputes them")
    verify.set_defaults(handler=cmd_store_verify)


def cmd_fetch(args: argparse.Namespace) -> int:
    settings = checked_input(args)
    from sim_pipeline.runners.pipeline import fetch_csv

    summary = fetch_csv(args.input, settings, progress=not args.quiet,
                        run_id=run_id_given(args.run_id))
    print(summary.render_fetch())
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from sim_pipeline.runners import dispatch

    result = dispatch.stage_by_name(args.name, settings_from(args), run_id_given(args.run_id),
                                    input_path=args.input, chunk=args.chunk, output=args.output)
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sim_pipeline.serve.options import ServeOptions
    from sim_pipeline.serve.run import serve

    settings = settings_from(args)
    options = ServeOptions(
        host=args.host, port=args.port, max_batch_size=args.max_batch_size or settings.batch_size,
        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_items=args.max_items,
        max_body_bytes=args.max_body_bytes, drain_seconds=args.drain_seconds,
        api_keys=api_keys())
    serve(settings, options)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from sim_pipeline.stages.embed.doctor import report

    print(report(settings_from(args), args.images))
    return 0


def _add_serve(commands: argparse._SubParsersAction, flags: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[flags], help="score online: an HTTP service "
                                "holding the model (docs/service.md)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="bind address; any other than 127.0.0.1 needs SIM_PIPELINE_API_KEYS")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int,
                       help="items per forward pass (default: --batch-size)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a batch waits for more items; 0: never")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="items in flight; past it requests get 503 with Retry-After")
    serve.add_argument("--max-items", type=int, default=256,
                       help="pairs, images or texts per request (at most 1000)")
    serve.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024,
                       help="larger request bodies get 413")
    serve.add_argument("--drain-seconds", type=int, default=30,
                       help="after SIGTERM, how long requests in flight may take to finish")
    serve.set_defaults(handler=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    flags = _settings_flags()
    parser = argparse.ArgumentParser(prog="sim-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also SIM_PIPELINE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", parents=[flags], help="score a CSV end to end")
    score.add_argument("input", help="CSV of image URLs and captions")
    score.add_argument("-o", "--output", help="default: <input>_scored.csv beside the input")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_run_id(score)
    score.set_defaults(handler=cmd_score)

    fetch = commands.add_parser("fetch", parents=[flags],
                                help="plan and fetch only: warm the image cache")
    fetch.add_argument("input", help="CSV of image URLs and captions")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_run_id(fetch)
    fetch.set_defaults(handler=cmd_fetch)

    stage = commands.add_parser("stage", parents=[flags], help="run one stage of a run")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("--input", help="the CSV (plan only)")
    stage.add_argument("--chunk", type=int, help="chunk index (per-chunk stages)")
    stage.add_argument("--output", help="scored CSV path (finalize only)")
    _add_run_id(stage)
    stage.set_defaults(handler=cmd_stage)

    doctor = commands.add_parser("doctor", parents=[flags], help="measure each precision and "
                                 "backend on this machine: images/s, cosine vs fp32")
    doctor.add_argument("--images", type=int, default=64, help="images to embed per option")
    doctor.set_defaults(handler=cmd_doctor)

    _add_serve(commands, flags)
    _add_store(commands, flags)
    register_spark(commands, flags)
    register_results(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; faults end in one line on stderr (exit 2), never a traceback unless
    ``--debug`` or ``SIM_PIPELINE_DEBUG=1`` asks for it."""
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with sigterm_stops():
            return handler(args)
    except UserError as error:
        return _fail(fault_sentence(error), 2)
    except KeyboardInterrupt as error:
        return _fail(fault_sentence(error), 130)
    except Terminated as error:
        return _fail(fault_sentence(error), 143)
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stderr.close()
        return 0
    except Exception as error:
        if debug_requested(getattr(args, "debug", False)):
            raise
        return _fail(fault_sentence(error), 2 if known_fault(error) is not None else 1)


def _fail(message: str, status: int) -> int:
    print(f"sim-pipeline: error: {message}", file=sys.stderr)
    return status


def console() -> NoReturn:
    """The ``sim-pipeline`` program: ``main``, then ``exit_without_teardown``."""
    exit_without_teardown(main())


def exit_without_teardown(status: int) -> NoReturn:
    """Exit once the exit handlers have run and output is flushed, skipping the interpreter's
    teardown: after a scoring run, freeing ~3,500 modules and ~450,000 objects (torch,
    transformers) took 1.2 s with every result already written. Where a thread other than the
    daemons still runs, a normal exit waits for it instead."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own, not public
    if run_exit_handlers is None or any(
            thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
            for thread in threading.enumerate()):
        sys.exit(status)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a pipe read no more
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    console()
