"""The wheel works when installed: jobs, Spark executors and services get the wheel, not this tree.

The wheel is built from a copy of the packaged files, installed (not editable) into a fresh venv
and run from there, into PostgreSQL and SQLite. The venv borrows this venv's third-party packages
through a ``.pth`` path line (no second torch download); a path line does not run the ``.pth``
files of the borrowed folder, so this checkout's editable install stays invisible.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import ImageServer
from tests.pairs import Case, serve_good_images, write_cases

REPO = Path(__file__).resolve().parent.parent
PACKAGED = ("pyproject.toml", "README.md", "LICENSE", "sim_pipeline")
IMPORTING_FOLDERS = ("sim_pipeline", "plugins", "dags", "bin", "bench", "tests", "examples")


def build_wheel(dest: Path) -> Path:
    """``pip wheel --no-deps`` of a clean copy, so the build leaves nothing in the checkout."""
    source = dest / "source"
    source.mkdir()
    for name in PACKAGED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "-w", str(dest / "dist"), str(source)])  # this venv's setuptools: no index
    return next((dest / "dist").glob("sim_pipeline-*.whl"))


def fresh_venv(folder: Path) -> Path:
    """A venv without pip that sees this venv's site-packages as a plain path, after its own."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(own.strip(), "borrowed-deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    return python


def run(command: list[str], **options: object) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          check=False, **options)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv holding the wheel, installed as jobs install it."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    python = fresh_venv(root / "venv")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--ignore-installed", "--no-compile", str(wheel)])
    return python.parent


def test_the_installed_copy_is_imported_and_carries_its_schema(installed: Path) -> None:
    shown = run([str(installed / "python"), "-c",
                 "import sim_pipeline.results.db as db; print(db.__file__); "
                 "print(*sorted(f.name for f in db.MIGRATIONS.iterdir()))"], cwd=installed)
    module, migrations = shown.splitlines()
    assert Path(module).is_relative_to(installed.parent), module
    assert "001_results.sql" in migrations.split()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_installed_cli_scores_a_csv_into_the_database(
        backend: str, installed: Path, tmp_path: Path, tiny_model: Path,
        image_server: ImageServer, request: pytest.FixtureRequest) -> None:
    urls = serve_good_images(image_server, 3, prefix=f"wheel-{backend}")
    cases = [Case(url, f"picture {i}", None) for i, url in enumerate(urls)]
    cases.append(Case(image_server.url(f"/wheel-{backend}/missing.jpg"), "gone", "http_404"))
    source = write_cases(tmp_path / "pairs.csv", cases)
    database = (request.getfixturevalue("pg_url") if backend == "postgresql"
                else f"sqlite:///{tmp_path / 'results.db'}")
    run([str(installed / "sim-pipeline"), "score", str(source), "--quiet",
         "--model", str(tiny_model), "--store", str(tmp_path / "store"),
         "--database-url", database, "--device", "cpu", "--precision", "fp32",
         "--run-id", f"wheel-{backend}", "--allow-hosts", image_server.allow_hosts],
        cwd=tmp_path)
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT row_number, similarity, error FROM similarity_scores "
            "WHERE run_id = :run ORDER BY row_number"), {"run": f"wheel-{backend}"}).all()
    engine.dispose()
    assert [(r.row_number, r.similarity is None, r.error) for r in rows] == [
        (0, False, None), (1, False, None), (2, False, None), (3, True, "http_404")]


def declared_distributions() -> set[str]:
    """Every distribution pyproject.toml names (core and extras) plus the constraints file's."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    lines += [line for extra in project["optional-dependencies"].values() for line in extra]
    pins = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    lines += [line for line in pins if line.strip() and not line.startswith("#")]
    return {re.match(r"[A-Za-z0-9._-]+", line.strip())[0].lower().replace("_", "-")
            for line in lines}


def imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for folder in IMPORTING_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_imported_third_party_module_is_declared() -> None:
    local = {"sim_pipeline", "sim_airflow", "tests", "bench", "dags", "plugins", "bin"}
    local |= {p.stem for folder in ("bin", "plugins") for p in (REPO / folder).glob("*.py")}
    owners = packages_distributions()
    undeclared = {}
    for module in imported_top_level_modules() - local - set(sys.stdlib_module_names):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared_distributions():
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not in pyproject.toml or constraints.txt: {undeclared}"
