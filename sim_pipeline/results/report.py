"""A run on one page: ``sim-pipeline results report RUN_ID -o report.html`` and ``write_report``.

Self-contained HTML (inline CSS, an inline SVG histogram; no scripts, no plotting library): the
run's status and success rate, the score distribution, errors by code, time per stage and the
slowest image hosts. Everything comes from the results database except the hosts' fetch times,
which live in the image records of the object store; without them that section says so.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sim_pipeline.core import errors
from sim_pipeline.core.config import Settings
from sim_pipeline.core.errors import UserError
from sim_pipeline.core.files import atomic_text
from sim_pipeline.core.layout import image_meta_key
from sim_pipeline.core.store import ObjectStore, S3Options, open_store, read_json
from sim_pipeline.results.db import ResultsDB
from sim_pipeline.results.query import (
    DEFAULT_STALE_AFTER,
    RunInfo,
    StageTime,
    error_counts,
    fetched_urls,
    get_run,
    now_utc,
    similarity_counts,
    stage_times,
)

if TYPE_CHECKING:
    from sim_pipeline.results.drift import Drift

HOST_SAMPLE = 5000      # image records read at most for the hosts section (an even sample)
HOST_PROBE = 50         # records read before deciding the store keeps no fetch times
UNIT = 10_000           # similarities have 4 decimals: counts are kept per 0.0001


def report_path(scored_csv: Path) -> Path:
    """``pairs_scored.csv`` -> ``pairs_scored_report.html``, beside it."""
    return scored_csv.with_name(f"{scored_csv.stem}_report.html")


def write_report(run_id: str, settings: Settings, path: str | Path, *,
                 stale_after: timedelta = DEFAULT_STALE_AFTER) -> Path:
    """Write the run's one-page HTML report to ``path`` (atomically) and return the path.

    Reads the results database of ``settings.database_url`` and, for the slowest hosts, the
    image records of ``settings.store``. Raises ``UserError`` for an unknown run.
    """
    db = ResultsDB(settings.database_url)
    page = render_report(db, run_id, settings.store, settings.s3, stale_after=stale_after,
                         drift=_drift(db, run_id, settings))
    with atomic_text(path) as handle:
        handle.write(page)
    return Path(path)


def _drift(db: ResultsDB, run_id: str, settings: Settings) -> Drift | str:
    """The run's drift against its reference (recorded), or why there is none."""
    from sim_pipeline.results.drift import drift_of_run  # scipy: only when a report is written

    try:
        return drift_of_run(db, run_id, settings)
    except UserError as error:
        return str(error)


def render_report(db: ResultsDB, run_id: str, store: str | None, s3: S3Options | None = None,
                  *,
                  stale_after: timedelta = DEFAULT_STALE_AFTER,
                  now: datetime | None = None, drift: Drift | str | None = None) -> str:
    now = now or now_utc()
    run = get_run(db, run_id)
    counts = similarity_counts(db, run_id)
    codes = error_counts(db, run_id)
    sections = [
        _header(run, now, stale_after),
        _cards(run, counts),
        _section("Scores", _histogram(counts)),
        '<div class="two">'
        + _section("Errors by code", _error_bars(codes, run))
        + _section("Time per stage", _stage_bars(stage_times(db, run_id)))
        + "</div>",
        _section("Slowest hosts", _hosts(db, run_id, store, s3)),
    ]
    if drift is not None:
        sections.insert(2, _section("Drift", _drift_section(drift)))
    title = f"sim-pipeline run {run.run_id}"
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>"
            + "".join(sections)
            + f"<footer>Generated {_when(now)} by sim-pipeline from the results table "
              f"<code>similarity_scores</code>.</footer></main></body></html>\n")


STYLE = """
body{margin:0;background:#f6f7f9;color:#1d2330;
  font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:980px;margin:0 auto;padding:28px 24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:15px;margin:0 0 12px;color:#3b4456;text-transform:uppercase;letter-spacing:.04em}
.meta,.note{color:#5b6477;font-size:13px}
.pill{display:inline-block;padding:1px 10px;border-radius:10px;font-size:13px;color:#fff;
  vertical-align:middle;margin-left:8px}
.succeeded{background:#2e8540}.failed{background:#c0392b}.stale{background:#b9770e}
.running{background:#2f6fb5}
section,.card{background:#fff;border-radius:10px;box-shadow:0 1px 2px #0001}
section{padding:18px 20px;margin:16px 0}
.cards,.two{display:flex;margin:16px 0}
.card{flex:1;padding:14px 16px}.card+.card{margin-left:12px}
.card b{display:block;font-size:26px}.card span{color:#5b6477;font-size:13px}
.two section{flex:1;margin:0}.two section+section{margin-left:16px}
table{border-collapse:collapse;width:100%;font-size:14px}
td,th{padding:4px 6px;text-align:left}
th{color:#5b6477;font-weight:600;border-bottom:1px solid #e3e6eb}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.n,th.n,td:first-child{white-space:nowrap}
.bar{background:#e8edf5;border-radius:3px;height:14px;min-width:40px}
.bar i{display:block;height:14px;border-radius:3px;background:#4c78a8}
.bar.err i{background:#d9534f}
svg text{font-size:11px;fill:#5b6477}
footer{color:#8a92a3;font-size:12px;margin-top:20px}
code{font-size:12px}
@media(max-width:720px){.cards,.two{display:block}
  .card+.card,.two section+section{margin:12px 0 0}}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def human_duration(delta: timedelta) -> str:
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _header(run: RunInfo, now: datetime, stale_after: timedelta) -> str:
    state = run.state(now, stale_after)
    took = human_duration(run.duration(now, stale_after))
    finished = {"running": f"running for {took}",
                "stale": f"no sign of life since {_when(run.last_activity)}"}.get(
                    state, f"took {took}")
    return (f"<h1>Run {_e(run.run_id)}<span class=\"pill {_e(state)}\">{_e(state)}</span></h1>"
            f"<div class=\"meta\">{_e(run.source)} &middot; model {_e(run.model)} &middot; "
            f"started {_when(run.started_at)}, {_e(finished)}</div>")


def _cards(run: RunInfo, counts: Counter[int]) -> str:
    ok, failed = run.rows_ok or 0, run.rows_error or 0
    share = run.scored_share
    total = run.rows_total if run.rows_total is not None else ok + failed
    mean = sum(u * n for u, n in counts.items()) / UNIT / ok if ok and counts else None
    cards = [
        (f"{total:,}", "rows in the input" if ok + failed == total
         else f"rows planned, {ok + failed:,} written"),
        ("-" if share is None else f"{share:.1%}", f"scored ({ok:,} rows)"),
        (f"{failed:,}", "rows with an error"),
        ("-" if mean is None else f"{mean:.4f}", "mean similarity"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{_e(big)}</b><span>{_e(small)}</span></div>'
        for big, small in cards) + "</div>"


def quantile(counts: Counter[int], q: float) -> float:
    """The q-quantile (nearest rank) of a distribution given as {value in 0.0001: rows}."""
    total, seen = sum(counts.values()), 0
    for unit in sorted(counts):
        seen += counts[unit]
        if seen >= q * total:
            return unit / UNIT
    return max(counts) / UNIT


def histogram_bins(counts: Counter[int], most: int = 40) -> tuple[int, int, list[int]]:
    """(first bin start, bin width, rows per bin), in units of 0.0001, with round bin edges."""
    low, high = min(counts), max(counts)
    width = next(w for w in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000,
                             10001) if (high // w - low // w + 1) <= most)
    start = low // width * width
    bins = [0] * (high // width - low // width + 1)
    for unit, n in counts.items():
        bins[unit // width - low // width] += n
    return start, width, bins


def _ticks(peak: int) -> list[int]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to ``peak``, at most 5 of them."""
    power = 1
    while True:
        for step in (power, 2 * power, 5 * power):
            if peak // step <= 4:
                return list(range(0, peak + 1, step))
        power *= 10


def _histogram(counts: Counter[int]) -> str:
    if not counts:
        return '<p class="note">No row was scored, so there is no score distribution.</p>'
    start, width, bins = histogram_bins(counts)
    w, h, left, bottom, top = 900, 220, 44, 26, 10
    plot_w, plot_h = w - left - 10, h - bottom - top
    peak, step = max(bins), plot_w / len(bins)
    parts = [f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" '
             f'aria-label="Histogram of similarity scores">']
    for tick in _ticks(peak):
        y = top + plot_h - plot_h * tick / peak
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#e3e6eb"/><text x="{left - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{tick:,}</text>')
    for i, n in enumerate(bins):
        lo, hi = (start + i * width) / UNIT, (start + (i + 1) * width) / UNIT
        bar = plot_h * n / peak
        parts.append(f'<rect x="{left + i * step + 1:.1f}" y="{top + plot_h - bar:.1f}" '
                     f'width="{max(step - 2, 1):.1f}" height="{bar:.1f}" fill="#4c78a8">'
                     f'<title>{lo:.4f} to {hi:.4f}: {n:,} rows</title></rect>')
    every = max(1, len(bins) // 8)
    for i in range(0, len(bins) + 1, every):
        x = left + i * step
        parts.append(f'<text x="{x:.1f}" y="{h - 8}" text-anchor="middle">'
                     f'{(start + i * width) / UNIT:.4g}</text>')
    parts.append("</svg>")
    stats = ", ".join(f"{name} {quantile(counts, q):.4f}" for name, q in
                      (("min", 0.0), ("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1.0)))
    rows = sum(bins)
    parts.append(f'<p class="note">{rows:,} scored rows, bins of {width / UNIT:g}: {stats}.</p>')
    return "".join(parts)


def _bar(share: float, kind: str = "") -> str:
    return f'<div class="bar {kind}"><i style="width:{max(share, 0.005) * 100:.1f}%"></i></div>'


def _error_bars(codes: list[tuple[str, int]], run: RunInfo) -> str:
    if not codes:
        return '<p class="note">No row has an error.</p>'
    rows = (run.rows_ok or 0) + (run.rows_error or 0) or 1
    peak = codes[0][1]
    retried = ' <span class="note">(retried by the next run)</span>'
    body = "".join(
        f'<tr><td><code>{_e(code)}</code>{retried if errors.retry_next_run(code) else ""}</td>'
        f'<td class="n">{n:,}</td><td class="n">{n / rows:.1%}</td>'
        f'<td>{_bar(n / peak, "err")}</td></tr>' for code, n in codes)
    return ('<table><tr><th>code</th><th class="n">rows</th><th class="n">share</th><th></th>'
            f"</tr>{body}</table>")


def _stage_bars(stages: list[StageTime]) -> str:
    if not stages:
        return ('<p class="note">No stage timings for this run: no stage has finished yet, or '
                'the run was written before the database kept them.</p>')
    peak = max(s.seconds for s in stages) or 1.0
    body = "".join(
        f'<tr><td>{_e(s.stage)}</td><td class="n">{human_duration(timedelta(seconds=s.seconds))}'
        f'</td><td class="n">{s.chunks or "-"}</td><td class="n">'
        f'{human_duration(timedelta(seconds=s.slowest)) if s.chunks else "-"}</td>'
        f'<td>{_bar(s.seconds / peak)}</td></tr>' for s in stages)
    return ('<table><tr><th>stage</th><th class="n">time</th><th class="n">chunks</th>'
            f'<th class="n">slowest</th><th></th></tr>{body}</table>'
            '<p class="note">Time summed over chunks; in Airflow, chunks run side by side.</p>')


@dataclass
class HostTimes:
    host: str
    seconds: list[float]
    failed: int = 0

    @property
    def mean(self) -> float:
        return sum(self.seconds) / len(self.seconds)


def fetch_seconds(record: dict[str, Any]) -> float | None:
    """The fetch time the fetcher recorded for the URL (records written before it kept one
    have none)."""
    seconds = record.get("seconds")
    return float(seconds) if isinstance(seconds, int | float) else None


def _read_record(store: ObjectStore, url_hash: str) -> dict[str, Any] | None:
    try:
        record = read_json(store, image_meta_key(url_hash))
    except (KeyError, UserError, ValueError):  # never fetched, damaged, not JSON
        return None
    return record if isinstance(record, dict) else None


def host_times(store: ObjectStore, urls: Iterable[tuple[str, str]]) -> tuple[
        list[HostTimes], int]:
    """Fetch times per host from the image records, slowest first; and how many records had
    one. Reads the first ``HOST_PROBE`` records, and the rest only if those carry times."""
    urls = list(urls)
    with ThreadPoolExecutor(16) as pool:
        def read(batch: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
            return list(pool.map(lambda u: _read_record(store, u[0]), batch))

        records = read(urls[:HOST_PROBE])
        if not any(r is not None and fetch_seconds(r) is not None for r in records):
            return [], 0
        records += read(urls[HOST_PROBE:])
    hosts: dict[str, HostTimes] = {}
    for (_, url), record in zip(urls, records, strict=True):
        seconds = None if record is None else fetch_seconds(record)
        if record is None or seconds is None:
            continue
        host = (urlsplit(url).hostname or "?").lower()
        entry = hosts.setdefault(host, HostTimes(host, []))
        entry.seconds.append(seconds)
        entry.failed += bool(record.get("error"))
    timed = sum(len(h.seconds) for h in hosts.values())
    return sorted(hosts.values(), key=lambda h: (-h.mean, h.host)), timed


def _hosts(db: ResultsDB, run_id: str, store_location: str | None,
           s3: S3Options | None) -> str:
    urls = fetched_urls(db, run_id, HOST_SAMPLE)
    if not urls:
        return '<p class="note">No image of this run was fetched.</p>'
    try:
        store = open_store(store_location, s3) if store_location else None
    except UserError as error:
        return f'<p class="note">Cannot open the object store for fetch times: {_e(error)}</p>'
    found, timed = host_times(store, urls) if store else ([], 0)
    if not timed:
        return ('<p class="note">The image records in the object store carry no per-URL fetch '
                'time, so the slowest hosts cannot be shown for this run.</p>')
    body = "".join(
        f'<tr><td>{_e(h.host)}</td><td class="n">{len(h.seconds):,}</td>'
        f'<td class="n">{h.mean:.2f} s</td><td class="n">{max(h.seconds):.2f} s</td>'
        f'<td class="n">{h.failed:,}</td></tr>' for h in found[:10])
    sample = "" if len(urls) < HOST_SAMPLE else f" (an even sample of {len(urls):,} URLs)"
    return ('<table><tr><th>host</th><th class="n">images</th><th class="n">mean fetch</th>'
            f'<th class="n">slowest</th><th class="n">failed</th></tr>{body}</table>'
            f'<p class="note">{timed:,} fetch times read from the image records{sample}.</p>')


DRIFT_COLOURS = {"run": "#4c78a8", "against": "#f58518"}


def _overlaid(histogram: dict[str, list[float]], run_id: str, against_id: str) -> str:
    """Both runs' score histograms on one chart, as shares of each run's scored rows."""
    edges = histogram.get("edges")
    if not edges:
        return '<p class="note">Neither run has a scored row.</p>'
    shares = {name: [n / (sum(histogram[name]) or 1) for n in histogram[name]]
              for name in DRIFT_COLOURS}
    w, h, left, bottom, top = 900, 200, 44, 26, 10
    plot_w, plot_h = w - left - 10, h - bottom - top
    peak, step = max(max(v) for v in shares.values()) or 1.0, plot_w / len(edges[:-1])
    parts = [f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" '
             f'aria-label="Score histograms of both runs, overlaid">']
    for name, colour in DRIFT_COLOURS.items():
        for i, share in enumerate(shares[name]):
            bar = plot_h * share / peak
            parts.append(f'<rect x="{left + i * step + 1:.1f}" y="{top + plot_h - bar:.1f}" '
                         f'width="{max(step - 2, 1):.1f}" height="{bar:.1f}" fill="{colour}" '
                         f'fill-opacity="0.5"><title>{_e(name)}: {edges[i]:.4f} to '
                         f'{edges[i + 1]:.4f}: {share:.1%}</title></rect>')
    every = max(1, len(edges) // 8)
    for i in range(0, len(edges), every):
        parts.append(f'<text x="{left + i * step:.1f}" y="{h - 8}" text-anchor="middle">'
                     f'{edges[i]:.4g}</text>')
    parts.append("</svg>")
    legend = " &middot; ".join(
        f'<span style="color:{colour}">&#9632;</span> {_e(label)}' for colour, label in
        ((DRIFT_COLOURS["run"], f"this run ({run_id})"),
         (DRIFT_COLOURS["against"], f"reference ({against_id})")))
    return "".join(parts) + f'<p class="note">{legend}; bars are shares of scored rows.</p>'


def _drift_section(drift: Drift | str) -> str:
    """The verdict line first, then both histograms overlaid, the figures, the canaries."""
    from sim_pipeline.results.drift import shown, shown_pvalue

    if isinstance(drift, str):
        return f'<p class="note">No drift figures: {_e(drift)}</p>'
    limits = drift.thresholds
    figures = [
        ("PSI (10 bins at the reference's deciles)", shown(drift.psi),
         f"watch {limits.psi_watch:g}, alert {limits.psi_alert:g}"),
        ("Kolmogorov-Smirnov D", shown(drift.ks_statistic), ""),
        ("Kolmogorov-Smirnov p-value", shown_pvalue(drift.ks_pvalue), ""),
        ("Wasserstein / reference std", shown(drift.wasserstein),
         f"alert {limits.wasserstein_alert:g}"),
        (f"share above {drift.cutoff:g}", f"{shown(drift.against_share_above, 3)} -> "
                                          f"{shown(drift.share_above, 3)}", ""),
        ("scored rows", f"{drift.against_scored_rows:,} -> {drift.scored_rows:,}", ""),
    ] + [(f"error {code}", f"{before:.1%} -> {now:.1%}",
          f"alert at +{limits.error_points_alert:g} points")
         for code, (now, before) in drift.error_shares.items()]
    body = "".join(f'<tr><td>{_e(name)}</td><td class="n">{_e(value)}</td>'
                   f'<td class="note">{_e(limit)}</td></tr>' for name, value, limit in figures)
    canaries = ("No canary pairs (set SIM_PIPELINE_CANARY_CSV to score some with every run)."
                if drift.canaries is None else drift.canaries.sentence())
    return (f'<p><span class="pill {_e(DRIFT_PILLS[drift.verdict])}">{_e(drift.verdict)}</span> '
            f'{_e(drift.headline())}</p>'
            + _overlaid(drift.histogram, drift.run_id, drift.against_run_id)
            + '<table><tr><th>figure</th><th class="n">value (reference -&gt; this run)</th>'
              f'<th>threshold</th></tr>{body}</table>'
            + f'<p class="note">Canaries: {_e(canaries)}</p>')


DRIFT_PILLS = {"stable": "succeeded", "watch": "stale", "alert": "failed"}
