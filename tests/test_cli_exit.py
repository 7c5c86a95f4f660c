"""The ``sim-pipeline`` program exits without tearing the interpreter down, yet runs every exit
handler, flushes its output, waits for a thread still at work and keeps its status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_exit_runs_handlers_flushes_output_and_keeps_the_status() -> None:
    done = run_python(
        "import atexit, sys; from sim_pipeline.cli import exit_without_teardown; "
        "atexit.register(print, 'handler ran'); sys.stdout.write('buffered '); "
        "sys.stderr.write('on stderr'); exit_without_teardown(3)")
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered handler ran\n",
                                                         "on stderr")


def test_exit_waits_for_a_thread_that_still_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    done = run_python(
        "import threading, time; from pathlib import Path; "
        "from sim_pipeline.cli import exit_without_teardown; "
        f"write = lambda: (time.sleep(0.5), Path({str(marker)!r}).write_text('done')); "
        "threading.Thread(target=write).start(); exit_without_teardown(0)")
    assert done.returncode == 0 and marker.read_text() == "done"


def test_the_program_exits_with_the_commands_status(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sim_pipeline.cli", "score",
                           str(tmp_path / "absent.csv")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("sim-pipeline: error:") and "absent.csv" in done.stderr
