"""How fast ``sim-pipeline score`` refuses an input it cannot plan.

Each refusal of the input's shape (empty, no caption or URL column, binary, UTF-16) comes before
any model load, network or database work; the goal is under 2 s. The database URL points at a
closed port and the model at a name no hub is asked for: a refusal that reached either would
show here as a different message or a longer time. Figures sit beside the bare start-up of the
``sim-pipeline`` command (``--help``) on the same machine.

    python -m bench.refusals [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAD_INPUTS: dict[str, bytes] = {
    "empty file": b"",
    "no caption column": b"url,text_x\nhttps://example.org/a.jpg,a cat\n",
    "no url column": b"where,caption\nhttps://example.org/a.jpg,a cat\n",
    "binary file": bytes(range(256)) * 64,
    "utf-16 text": "url,caption\n".encode("utf-16"),
}


def cpu_line() -> str:
    model, flags = platform.processor() or "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = " ".join(f for f in value.split() if f.startswith(("avx", "sse4", "amx")))
                break
    except OSError:
        pass
    return f"CPU: {model}; flags: {flags or 'n/a'}"


def timed(args: list[str]) -> tuple[float, int, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sim_pipeline.cli", *args],
                          capture_output=True, text=True, timeout=120)
    return time.monotonic() - started, done.returncode, done.stderr.strip().splitlines()[-1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args()
    print(cpu_line())
    startup = min(timed(["--help"])[0] for _ in range(args.rounds))
    print(f"{'input':<20} {'refused in':>10} {'/ start-up':>10}  message")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in BAD_INPUTS.items():
            path = Path(folder) / "input.csv"
            path.write_bytes(data)
            command = ["score", str(path), "--store", f"{folder}/store", "--model",
                       "no-such-org/no-such-model", "--database-url",
                       "postgresql://postgres@127.0.0.1:9/refusals"]
            runs = [timed(command) for _ in range(args.rounds)]
            seconds = min(run[0] for run in runs)
            code, message = runs[0][1], (runs[0][2] or [""])[0]
            print(f"{name:<20} {seconds:>9.2f}s {seconds / startup:>9.1f}x  (exit {code}) "
                  f"{message[:90]}")
    print(f"{'start-up (--help)':<20} {startup:>9.2f}s {1.0:>9.1f}x")


if __name__ == "__main__":
    main()
