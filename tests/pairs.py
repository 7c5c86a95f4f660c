"""Builders for mixed good/bad input files served by the test image server."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ImageServer, Route, make_image

GOOD_FORMATS = (("JPEG", "image/jpeg", ".jpg"), ("PNG", "image/png", ".png"),
                ("WEBP", "image/webp", ".webp"))


@dataclass(frozen=True)
class Case:
    url: str
    caption: str
    expected_error: str | None


def serve_good_images(server: ImageServer, count: int, prefix: str = "good") -> list[str]:
    urls = []
    for i in range(count):
        fmt, content_type, suffix = GOOD_FORMATS[i % len(GOOD_FORMATS)]
        body = make_image(seed=1000 + i, fmt=fmt)
        route = Route(body=body, content_type=content_type)
        urls.append(server.add(f"/{prefix}/{i}{suffix}", route))
    return urls


def mixed_cases(server: ImageServer, prefix: str = "mix") -> list[Case]:
    """~50 rows: good images (some repeated), every per-row error the pipeline promises."""
    good = serve_good_images(server, 30, prefix)
    truncated = make_image(seed=7, size=(400, 300))[:600]
    bad = {
        "missing": (server.url(f"/{prefix}/missing.jpg"), "http_404"),
        "error": (server.add(f"/{prefix}/error.jpg", Route(500, b"boom", "text/plain")),
                  "http_500"),
        "html": (server.add(f"/{prefix}/page.jpg",
                            Route(body=b"<!doctype html><html>hi</html>")), "not_an_image"),
        "empty": (server.add(f"/{prefix}/empty.jpg", Route(body=b"")), "not_an_image"),
        "truncated": (server.add(f"/{prefix}/truncated.jpg", Route(body=truncated)),
                      "decode_error"),
        "slow": (server.add(f"/{prefix}/slow.jpg",
                            Route(body=make_image(seed=8), delay=8.0)), "timeout"),
        "refused": (f"http://127.0.0.1:{server.closed_port}/nothing-listens.jpg",
                    "connection_error"),
        "blocked": ("http://127.0.0.1:9/loopback-not-allowed.jpg", "blocked_address"),
    }
    cases = [Case(url, f"a photo number {i} of something colourful", None)
             for i, url in enumerate(good)]
    cases += [Case(good[0], "the first image again, another caption", None),
              Case(good[1], "a photo number 1 of something colourful", None)]
    cases += [Case(url, f"caption for {name}", code) for name, (url, code) in bad.items()]
    cases += [
        Case("not a url", "caption", "invalid_url"),
        Case("http://", "caption", "invalid_url"),
        Case("ftp://127.0.0.1/x.jpg", "caption", "unsupported_scheme"),
        Case("data:image/png;base64,iVBORw0KGgo=", "caption", "unsupported_scheme"),
        Case("file:///etc/hosts", "caption", "unsupported_scheme"),
        Case(good[2], "", "missing_caption"),
        Case(good[3], "   ", "missing_caption"),
        Case("", "no url at all", "invalid_url"),
        Case(good[4], "a caption " + "that goes on and on " * 40, None),
        Case(good[5], "ünïcödé caption, with \"quotes\", commas\nand a newline", None),
    ]
    return cases


def write_cases(path: Path, cases: list[Case]) -> Path:
    """CSV with an extra leading column and unusual header spellings."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "Image_URL", "Caption", "notes"])
        for i, case in enumerate(cases):
            writer.writerow([f"id-{i}", case.url, case.caption, f"note {i}"])
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))
