"""``/docs`` renders on a cluster without internet: every file the page loads comes from the
service itself (Swagger UI's files from the installed package), none from an outside host."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sim_pipeline.core.config import Settings
from sim_pipeline.serve.app import create_app
from sim_pipeline.serve.options import ServeOptions

KEY = "docs-test-key"
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.fixture()
def client(tmp_path: Path) -> TestClient:
    """The app without its lifespan: no model is loaded, the docs need none."""
    settings = Settings(store=str(tmp_path / "store"),
                        database_url=f"sqlite:///{tmp_path / 'results.db'}")
    return TestClient(create_app(settings, ServeOptions(api_keys=(KEY,))))


def test_the_docs_page_loads_nothing_from_outside(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert "SwaggerUIBundle" in html
    assert not re.search(r"(?:https?:)?//[\w.-]+", html), "the page names an outside host"
    assert '"validatorUrl": null' in html  # the validator badge would call validator.swagger.io
    references = [a or b for a, b in REFERENCE.findall(html)]
    assert {"/openapi.json", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
            "/docs/assets/favicon-32x32.png"} <= set(references)
    for reference in references:  # each one answered by the service, without an API key
        answer = client.get(reference)
        assert answer.status_code == 200, reference
        assert len(answer.content) > 500, reference
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("application/javascript", "text/javascript"))


def test_the_docs_assets_open_no_other_path(client: TestClient) -> None:
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/docs/assets/missing.js").status_code == 404
    assert client.get("/metrics").status_code == 401  # keys still guard everything else
    assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/redoc").status_code == 401  # no CDN-backed ReDoc page either
    assert client.get("/redoc", headers={"X-API-Key": KEY}).status_code == 404
