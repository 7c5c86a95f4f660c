"""The documentation states what the code does: README's error codes are the code's own table."""

from __future__ import annotations

from pathlib import Path

from sim_pipeline.core import errors

README = Path(__file__).resolve().parent.parent / "README.md"


def _later(code: errors.ErrorCode) -> str:
    if code.retry_next_run:
        return "yes"
    return "no" if code.stage == "plan" else "with `--refetch-errors`"


def error_code_table() -> str:
    """The README's table of codes, as ``errors.CODES`` (and the ``http_<status>`` rule) say."""
    rows = [("`" + name + "`", code) for name, code in errors.CODES.items()]
    rows.insert(8, ("`http_<status>`", errors.describe("http_404")))
    lines = ["| code | stage | meaning | retried in the run | retried by a later run |",
             "| --- | --- | --- | --- | --- |"]
    for name, code in rows:
        assert code is not None
        now = "408, 429, 5xx" if name == "`http_<status>`" else ("yes" if code.retry_now else "no")
        later = "408, 429, 5xx" if name == "`http_<status>`" else _later(code)
        lines.append(f"| {name} | {code.stage} | {code.meaning} | {now} | {later} |")
    return "\n".join(lines) + "\n"


def test_readme_lists_every_error_code_as_the_code_table_defines_it() -> None:
    assert error_code_table() in README.read_text(encoding="utf-8"), (
        "README's error-code table differs from sim_pipeline.core.errors.CODES; paste:\n"
        + error_code_table())


def test_http_codes_are_retried_exactly_for_408_429_and_5xx() -> None:
    retried = {s for s in range(100, 600) if errors.retry_now(errors.http_error(s))}
    assert retried == {408, 429, *range(500, 600)}
    assert errors.is_transient("timeout") and not errors.retry_now("timeout")
    assert errors.describe("not_a_code") is None and not errors.is_transient(None)
