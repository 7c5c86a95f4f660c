"""``store verify`` finds every damage a run finds, over every kind of object a run verifies, and
the debris of killed writers; ``--repair`` removes both, and the rerun gives the same output.
A successful run leaves no debris of earlier, killed attempts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sim_pipeline import cli
from sim_pipeline.core.config import Settings
from sim_pipeline.core.files import HOST_TAG
from sim_pipeline.core.layout import LEASES_PREFIX
from tests.conftest import ImageServer
from tests.test_score_cli import score
from tests.test_self_healing import XATTR, files, scored_run


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def temp_beside(path: Path, pid: int) -> Path:
    """A 0-byte temporary file as a writer killed mid-write leaves it."""
    tmp = path.with_name(f".{path.name}.{HOST_TAG}.{pid}-1.tmp")
    tmp.touch()
    return tmp


def stale_lease(store: Path) -> Path:
    lease = store / LEASES_PREFIX / "images" / "ab" / ("ab" + "0" * 62)
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"host": HOST_TAG, "pid": dead_pid(), "expires": 4e9}))
    return lease


def one(store: Path, pattern: str) -> Path:
    return next(p for p in files(store, "runs") if p.match(pattern))


def truncate(path: Path) -> None:
    """Cut in place: the extended attribute (the digest of the whole file) stays."""
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    """Overwrite in place: the extended attribute stays and no longer matches."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with path.open("r+b") as handle:
        handle.write(bytes(data))


def edit_without_xattr(path: Path) -> None:
    """An edit by a tool that drops extended attributes: only the results' record can tell."""
    os.removexattr(path, XATTR)
    data = path.read_bytes()
    assert b"similarity" in data
    path.write_bytes(data.replace(b"similarity", b"similaritx", 1))


DAMAGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated chunk rows": ("*/chunks/00000/rows.arrow", truncate),
    "results with a flipped byte": ("*/chunks/00001/results.*.arrow", flip_a_byte),
    "results edited without their xattr": ("*/chunks/00000/results.*.arrow", edit_without_xattr),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_store_verify_finds_what_a_run_finds_and_repair_lets_the_rerun_heal_it(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str], damage: str) -> None:
    prefix = "verify-" + damage.replace(" ", "-")
    source, first = scored_run(tmp_path, settings, image_server, prefix)
    store = Path(settings.store)
    pattern, spoil = DAMAGES[damage]
    damaged = one(store, pattern)
    spoil(damaged)
    capsys.readouterr()
    assert cli.main(["store", "verify", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert "damaged   1\n" in out and str(damaged) in out
    assert "chunk rows" in out and "results" in out, "every kind is counted"
    assert cli.main(["store", "verify", "--repair", "--store", str(store)]) == 0
    assert "removed" in capsys.readouterr().out
    assert cli.main(["store", "verify", "--store", str(store)]) == 0
    assert "damaged   0" in capsys.readouterr().out
    assert score(source, settings, "--chunk-size", "5") == 0
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first


def test_store_verify_reports_stray_temporaries_and_leases_and_repair_removes_them(
        tmp_path: Path, settings: Settings, image_server: ImageServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    scored_run(tmp_path, settings, image_server, "verify-stray")
    store = Path(settings.store)
    vector = files(store, "embeddings")[0]
    stray = [temp_beside(vector, dead_pid()), stale_lease(store)]
    live = temp_beside(files(store, "images")[0], os.getpid())  # a writer still at work
    capsys.readouterr()
    assert cli.main(["store", "verify", "--store", str(store)]) == 0, "debris is not damage"
    out = capsys.readouterr().out
    assert "stray     2 " in out and all(str(p) in out for p in stray)
    assert str(live) not in out
    assert cli.main(["store", "verify", "--repair", "--store", str(store)]) == 0
    assert "removed   2 objects" in capsys.readouterr().out
    assert not any(p.exists() for p in stray) and live.exists()


def test_a_successful_rerun_after_a_kill_leaves_no_debris(
        tmp_path: Path, settings: Settings, image_server: ImageServer) -> None:
    source, first = scored_run(tmp_path, settings, image_server, "no-debris")
    store = Path(settings.store)
    killed = dead_pid()
    debris = [temp_beside(tmp_path / "pairs_scored.csv", killed),
              temp_beside(files(store, "embeddings")[0], killed),
              temp_beside(one(store, "*/chunks/00000/rows.arrow"), killed), stale_lease(store)]
    old = temp_beside(files(store, "images")[0], 1)  # another host's writer, long gone
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert score(source, settings, "--chunk-size", "5") == 0
    assert (tmp_path / "pairs_scored.csv").read_bytes() == first
    assert [p for p in [*debris, old] if p.exists()] == []
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
