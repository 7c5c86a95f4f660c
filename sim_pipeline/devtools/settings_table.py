"""docs/configuration.md's settings table, generated from ``Settings``: each field's help is
declared beside it, so the flags' help and this table cannot drift apart.

    python -m sim_pipeline.devtools.settings_table
"""

from __future__ import annotations

from dataclasses import MISSING, Field
from typing import Any

from sim_pipeline.core.config import ENV_PREFIX, flag_of, user_settings


def _default(f: Field[Any]) -> str:
    if f.default is MISSING or f.default in (None, ""):
        return "none"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"`{f.default}`"


def settings_table() -> str:
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{ENV_PREFIX}{f.name.upper()}` | `{flag_of(f.name)}` | {_default(f)} | "
              f"{f.metadata['help']} |" for f in user_settings()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
