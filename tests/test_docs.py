"""The documentation states what the code does: README's error codes are the code's own table."""

from __future__ import annotations

import ast
import re
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
    after = [name for name, _ in rows].index("`" + errors.CONNECTION_ERROR + "`") + 1
    rows.insert(after, ("`http_<status>`", errors.describe("http_404")))
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
    assert errors.retry_next_run("timeout") and not errors.retry_now("timeout")
    assert errors.describe("not_a_code") is None and not errors.retry_next_run(None)


DOCS = README.parent / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a `# comment` in a shell example is no heading."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N after."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = repeats.get(slug, 0)
            repeats[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked offline
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1, "docs/ holds the details README links to"
    broken = {page.name: found for page in pages if (found := broken_links(page))}
    assert not broken, broken


def pipeline_diagram(text: str) -> str:
    """The fenced block that draws the pipeline (the one starting at the input CSV)."""
    blocks, current = [], None
    for line in text.splitlines(keepends=True):
        if FENCE.match(line.strip()):
            if current is None:
                current = []
            else:
                blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    drawn = [block for block in blocks if block.startswith("input CSV")]
    assert len(drawn) == 1, "expected exactly one pipeline diagram"
    return drawn[0]


def test_the_pipeline_diagram_is_the_same_in_readme_architecture_and_the_dag() -> None:
    root = README.parent
    architecture = pipeline_diagram((root / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    dag_doc = ast.get_docstring(ast.parse((root / "dags" / "similarity_scoring.py").read_text(
        encoding="utf-8")), clean=False)
    assert dag_doc is not None
    assert pipeline_diagram(README.read_text(encoding="utf-8")) == architecture
    assert pipeline_diagram(dag_doc) == architecture


def test_readme_is_a_five_minute_read() -> None:
    size = len(README.read_text(encoding="utf-8").encode())
    assert size <= 13_000, f"README.md is {size:,} bytes; move details into docs/"
