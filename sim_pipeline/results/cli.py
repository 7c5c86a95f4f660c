"""``sim-pipeline results ...``: look at the results table from a terminal.

    results runs                          the newest runs, one line each
    results show RUN_ID [--errors]        one run: summary and its first rows
    results export RUN_ID -o FILE         the run's scored CSV (or .parquet), from the database
    results query --url URL | --caption T the newest score of an image or a caption, per model
    results prune --older-than 90d        delete old runs (a dry run unless --yes)
    results report RUN_ID -o FILE.html    a one-page HTML report
    results compare RUN_A RUN_B           how far two runs agree: correlations, shared rows
    results drift RUN [--against RUN]     did the scores move: PSI, KS, Wasserstein, error shares

Exit status: 0 done, 1 a query that found nothing, 2 a problem the user can fix (unknown run,
unreachable database; one sentence on stderr), 3 a drift alert. The database URL is shown without
its password.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sim_pipeline.core.config import load_settings

if TYPE_CHECKING:
    from sim_pipeline.results.compare import Comparison, Disagreement
    from sim_pipeline.results.db import ResultsDB
    from sim_pipeline.results.drift import Drift

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w``."""
    match = DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write e.g. 90d, 12h, 30m or 2w")
    return timedelta(**{UNITS[match.group(2).lower()]: float(match.group(1))})


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def thresholds(text: str) -> tuple[float, float]:
    """``0.6`` (both runs) or ``0.6,0.55`` (run A, run B)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a threshold; write e.g. 0.6 (both runs) or 0.6,0.55 (A,B)")
    return (values[0], values[-1])


def percent(text: str) -> float:
    """``10`` or ``10%``: a share of rows, above 0 and at most 100."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage; write e.g. 10%")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``results`` command group to the ``sim-pipeline`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL of the results database "
                        "(default: SIM_PIPELINE_DATABASE_URL)")
    stale = argparse.ArgumentParser(add_help=False)
    stale.add_argument("--stale-after", type=duration, default=None, metavar="DURATION",
                       help="a running run with no heartbeat for this long shows as stale "
                            "(default 30m)")

    results = commands.add_parser("results", help="look at the results table: runs, scores, "
                                  "exports, reports",
                                  description="Look at the results table from a terminal.")
    sub = results.add_subparsers(dest="results_command", required=True, metavar="COMMAND")

    runs = sub.add_parser("runs", parents=[common, stale], help="list the newest runs")
    runs.add_argument("--limit", type=positive, default=20, help="runs shown (default 20)")
    runs.set_defaults(handler=cmd_runs)

    show = sub.add_parser("show", parents=[common, stale], help="one run and its first rows")
    show.add_argument("run", metavar="RUN_ID")
    show.add_argument("--errors", action="store_true", help="only rows with an error")
    show.add_argument("--limit", type=positive, default=20, help="rows shown (default 20)")
    show.set_defaults(handler=cmd_show)

    export = sub.add_parser("export", parents=[common],
                            help="write a run's scored CSV (or .parquet) from the database")
    export.add_argument("run", metavar="RUN_ID")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="FILE.csv (the run's delimiter) or FILE.parquet")
    export.set_defaults(handler=cmd_export)

    query = sub.add_parser("query", parents=[common],
                           help="the newest scores of an image URL or a caption")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--url", help="an image URL (as in the input, surrounding spaces ignored)")
    what.add_argument("--caption", help="a caption (exact text, surrounding spaces ignored)")
    query.add_argument("--model", help="only this model id or path")
    query.add_argument("--limit", type=positive, default=20, help="rows shown (default 20)")
    query.set_defaults(handler=cmd_query)

    prune = sub.add_parser("prune", parents=[common],
                           help="delete runs last active before a cutoff (dry run unless --yes)")
    prune.add_argument("--older-than", type=duration, required=True, metavar="DURATION",
                       help="e.g. 90d: runs with no activity for this long")
    prune.add_argument("--yes", action="store_true", help="really delete them")
    prune.set_defaults(handler=cmd_prune)

    report = sub.add_parser("report", parents=[common, stale],
                            help="write a one-page HTML report of a run")
    report.add_argument("run", metavar="RUN_ID")
    report.add_argument("-o", "--output", metavar="FILE.html",
                        help="default: <RUN_ID>_report.html in the current folder")
    report.add_argument("--store", help="object store with the image records (fetch times); "
                        "default: SIM_PIPELINE_STORE")
    report.set_defaults(handler=cmd_report)

    compare = sub.add_parser("compare", parents=[common],
                             help="how far two runs agree: correlations, rows both keep, "
                                  "rows that disagree most")
    compare.add_argument("run_a", metavar="RUN_A")
    compare.add_argument("run_b", metavar="RUN_B")
    compare.add_argument("--threshold", type=thresholds, metavar="T[,T_B]",
                         help="rows kept at similarity >= T: one threshold for both runs, or "
                              "one per run (A,B), since models score on different scales")
    compare.add_argument("--top", type=percent, default=10.0, metavar="K%",
                         help="compare each run's top K%% of the matched rows (default 10%%)")
    compare.set_defaults(handler=cmd_compare)

    drift = sub.add_parser("drift", parents=[common],
                           help="did the run's scores move against a reference run (exit 3 on "
                                "an alert): PSI, KS, Wasserstein, error shares, canaries")
    drift.add_argument("run", metavar="RUN_ID")
    drift.add_argument("--against", metavar="RUN_ID",
                       help="the reference run (default: the previous succeeded run of the same "
                            "input name, else SIM_PIPELINE_DRIFT_REFERENCE)")
    drift.add_argument("--json", action="store_true", help="the same figures as JSON")
    drift.set_defaults(handler=cmd_drift)


def _db(args: argparse.Namespace) -> ResultsDB:
    from sim_pipeline.results.db import ResultsDB

    return ResultsDB(load_settings({"database_url": args.database_url}).database_url)


def _stale_after(args: argparse.Namespace) -> timedelta:
    from sim_pipeline.results.query import DEFAULT_STALE_AFTER

    return args.stale_after or DEFAULT_STALE_AFTER


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          numeric: Sequence[int] = (), whole: Sequence[int] = (0,), widest: int = 48) -> str:
    """A plain terminal table: padded columns, numbers right-aligned, long text cut with '…'
    (except in the ``whole`` columns: ids people copy).

    Whitespace inside a cell becomes one space and an empty cell shows '-', so the columns split
    on runs of two spaces (``awk -F '  +'``).
    """
    def cell(i: int, value: object) -> str:
        text = " ".join(str("" if value is None else value).split()) or "-"
        return text if len(text) <= widest or i in whole else text[:widest - 1] + "…"

    cells = [[cell(i, v) for i, v in enumerate(row)] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _count(n: int | None) -> str | None:
    return None if n is None else f"{n:,}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M")


def _short_model(model: str) -> str:
    return model.rstrip("/").split("/")[-1] if "/" in model and Path(model).is_absolute() \
        else model


def _similarity(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def cmd_runs(args: argparse.Namespace) -> int:
    from sim_pipeline.results.query import list_runs, now_utc
    from sim_pipeline.results.report import human_duration

    db, now, stale_after = _db(args), now_utc(), _stale_after(args)
    found = list_runs(db, args.limit)
    if not found:
        print(f"no runs yet in {db.shown_url}")
        return 0
    rows = [[r.run_id, Path(r.source).name, _short_model(r.model), _when(r.started_at),
             human_duration(r.duration(now, stale_after)), _count(r.rows_total),
             _count(r.rows_ok), _count(r.rows_error), r.state(now, stale_after)] for r in found]
    print(table(["RUN", "SOURCE", "MODEL", "STARTED (UTC)", "DURATION", "ROWS", "OK", "ERRORS",
                 "STATUS"], rows, numeric=(4, 5, 6, 7)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from sim_pipeline.results.query import error_counts, get_run, now_utc, run_rows
    from sim_pipeline.results.report import human_duration

    db, now, stale_after = _db(args), now_utc(), _stale_after(args)
    run = get_run(db, args.run)
    ok, failed = run.rows_ok or 0, run.rows_error or 0
    share = "" if run.scored_share is None else f" ({run.scored_share:.1%} scored)"
    codes = ", ".join(f"{code} {n:,}" for code, n in error_counts(db, run.run_id)) or "none"
    state, took = run.state(now, stale_after), human_duration(run.duration(now, stale_after))
    timing = {"running": f"running for {took}",
              "stale": f"no heartbeat since {_when(run.last_activity)} UTC"}.get(state,
                                                                              f"took {took}")
    print("\n".join([
        f"run       {run.run_id}",
        f"source    {run.source}",
        f"model     {run.model}",
        f"status    {state}: started {_when(run.started_at)} UTC, {timing}",
        f"rows      {_count(run.rows_total)}: {ok:,} scored, {failed:,} errors{share}",
        f"errors    {codes}",
        *([f"failure   {run.failure}"] if run.failure else []),
        "",
    ]))
    rows = run_rows(db, run.run_id, errors_only=args.errors, limit=args.limit)
    matched = failed if args.errors else ok + failed
    if not rows:
        print("no rows with an error" if args.errors else "no rows written yet")
        return 0
    print(table(["ROW", "SIMILARITY", "ERROR", "IMAGE URL", "CAPTION"],
                [[r.row_number, _similarity(r.similarity), r.error, r.image_url, r.caption]
                 for r in rows], numeric=(0, 1)))
    if matched > len(rows):
        print(f"\nshowing {len(rows)} of {matched:,} {'failed ' if args.errors else ''}rows; "
              "--limit N shows more")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sim_pipeline.results.export import export_run

    done = export_run(_db(args), args.run, args.output)
    if done.reduced:
        print(f"note: run {done.run.run_id} was written before the database kept its input "
              "columns; exported image_url and caption only", file=sys.stderr)
    if done.run.rows_total is not None and done.rows != done.run.rows_total:
        print(f"note: run {done.run.run_id} has {done.rows} of its {done.run.rows_total} rows "
              f"(status {done.run.status})", file=sys.stderr)
    print(f"wrote {_plural(done.rows, 'row')} of run {done.run.run_id} to {done.path}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from sim_pipeline.core.layout import caption_hash, sha256_hex
    from sim_pipeline.results.query import latest_scores

    if args.url is not None:
        found = latest_scores(_db(args), url_hash=sha256_hex(args.url.strip()),
                              model=args.model, limit=args.limit)
        other, name = "CAPTION", "caption"
    else:
        found = latest_scores(_db(args), caption_hash=caption_hash(args.caption.strip()),
                              model=args.model, limit=args.limit)
        other, name = "IMAGE URL", "image_url"
    if not found:
        print(f"no scores for that {'URL' if args.url is not None else 'caption'}",
              file=sys.stderr)
        return 1
    print(table(["SIMILARITY", "ERROR", "MODEL", "RUN", "SCORED (UTC)", other],
                [[_similarity(s.similarity), s.error, _short_model(s.model), s.run_id,
                  _when(s.scored_at), getattr(s, name)] for s in found], numeric=(0,),
                whole=(3,)))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from sim_pipeline.results.query import delete_runs, now_utc, prunable_runs

    db, now = _db(args), now_utc()
    cutoff = _when(now - args.older_than) + " UTC"
    found = prunable_runs(db, args.older_than, now)
    if not found:
        print(f"no runs last active before {cutoff}; nothing to delete")
        return 0
    rows = sum(n for _, n in found)
    print(table(["RUN", "STATUS", "LAST ACTIVE (UTC)", "ROWS"],
                [[r.run_id, r.status, _when(r.last_activity), _count(n)] for r, n in found],
                numeric=(3,)))
    if not args.yes:
        print(f"\ndry run: would delete {_plural(len(found), 'run')} ({_plural(rows, 'row')}) "
              f"last active before {cutoff}; add --yes to delete them")
        return 0
    deleted = delete_runs(db, [r.run_id for r, _ in found])
    print(f"\ndeleted {_plural(len(found), 'run')} ({_plural(deleted, 'row')}) last active "
          f"before {cutoff}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sim_pipeline.results.report import write_report

    settings = load_settings({"database_url": args.database_url, "store": args.store})
    path = write_report(args.run, settings, args.output or f"{args.run}_report.html",
                        stale_after=_stale_after(args))
    print(f"wrote the report of run {args.run} to {path}")
    return 0


def _share(part: int, whole: int) -> str:
    return f"{part:,} ({part / whole:.1%})"


def _coefficient(value: float | None) -> str:
    return "undefined (one run gives every matched row the same score)" if value is None \
        else f"{value:.4f}"


def _comparison_lines(found: Comparison, run_a: str, run_b: str) -> list[str]:
    """The summary above the table: one labelled line per figure."""
    n = found.common
    lines = [
        ("run A", f"{run_a}: {found.scored_a:,} scored rows"),
        ("run B", f"{run_b}: {found.scored_b:,} scored rows"),
        ("matched", f"{n:,} rows scored in both (same image URL and caption)"),
        ("pearson", _coefficient(found.pearson)),
        ("spearman", _coefficient(found.spearman)),
        (f"top {found.top_percent:g}%", f"{found.top_rows:,} rows each, "
                                        f"{_share(found.top_both, found.top_rows)} in both"),
    ]
    if found.kept is not None:
        kept = found.kept
        same = "" if kept.threshold_a == kept.threshold_b else f" / {kept.threshold_b:g}"
        lines.append(("kept", f"at >= {kept.threshold_a:g}{same}: A {_share(kept.by_a, n)}, "
                              f"B {_share(kept.by_b, n)}, both {_share(kept.by_both, n)}; "
                              f"A and B agree on {_share(kept.by_both + kept.by_neither, n)}"))
    return [f"{label:<9} {text}" for label, text in lines]


def _disagreement_table(rows: list[Disagreement]) -> str:
    many = len(rows) > 1
    title = (f"the {_plural(len(rows), 'row')} that disagree{'' if many else 's'} most "
             "(rank percentile: 0 lowest, 100 highest score of the matched rows)")
    return title + "\n" + table(
        ["ROW A", "ROW B", "SIM A", "PCT A", "SIM B", "PCT B", "IMAGE URL", "CAPTION"],
        [[d.row_a, d.row_b, _similarity(d.similarity_a), f"{100 * d.percentile_a:.1f}",
          _similarity(d.similarity_b), f"{100 * d.percentile_b:.1f}", d.image_url, d.caption]
         for d in rows], numeric=(0, 1, 2, 3, 4, 5), widest=40)


def cmd_compare(args: argparse.Namespace) -> int:
    from sim_pipeline.results.compare import compare_runs

    found = compare_runs(_db(args), args.run_a, args.run_b, args.top, args.threshold)
    print("\n".join(_comparison_lines(found, args.run_a, args.run_b)))
    print("\n" + (_disagreement_table(found.disagreements) if found.disagreements
                  else "every matched row has the same rank in both runs"))
    return 0


def _drift_lines(found: Drift) -> list[str]:
    """The verdict line, then the figures, then each error code's share in both runs."""
    from sim_pipeline.results.drift import shown, shown_pvalue

    limits = found.thresholds
    figures = [
        ["psi", shown(found.psi), f"watch {limits.psi_watch:g}, alert {limits.psi_alert:g}"],
        ["ks statistic", shown(found.ks_statistic), ""],
        ["ks p-value", shown_pvalue(found.ks_pvalue), ""],
        ["wasserstein / std", shown(found.wasserstein), f"alert {limits.wasserstein_alert:g}"],
        [f"share > {found.cutoff:g}", f"{shown(found.against_share_above, 3)} -> "
                                      f"{shown(found.share_above, 3)}", ""],
        ["scored rows", f"{found.against_scored_rows:,} -> {found.scored_rows:,}", ""],
    ]
    figures += [[f"error {code}", f"{before:.1%} -> {now:.1%}",
                 f"alert +{limits.error_points_alert:g} points"]
                for code, (now, before) in found.error_shares.items()]
    canaries = "none scored (SIM_PIPELINE_CANARY_CSV)" if found.canaries is None \
        else found.canaries.sentence()
    return [found.headline(), "",
            table(["FIGURE", "VALUE (REFERENCE -> RUN)", "THRESHOLD"], figures, numeric=(1,)),
            "", f"canaries  {canaries}"]


def cmd_drift(args: argparse.Namespace) -> int:
    import json

    from sim_pipeline.results.db import ResultsDB
    from sim_pipeline.results.drift import drift_of_run

    settings = load_settings({"database_url": args.database_url})
    found = drift_of_run(ResultsDB(settings.database_url), args.run, settings, args.against)
    if args.json:
        print(json.dumps(found.to_json(), indent=2, sort_keys=True))
    else:
        print("\n".join(_drift_lines(found)))
    return found.exit_status
