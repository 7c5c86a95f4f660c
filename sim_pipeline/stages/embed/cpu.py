"""What this machine's CPU says it can do, read from ``/proc/cpuinfo``: never assumed.

Precision (bf16 where the CPU has bf16 instructions) and int8 weights (signed where the CPU
multiplies unsigned by signed bytes without saturating) are chosen from these flags; ``sim-pipeline
doctor`` measures what they give, since a virtual CPU's flags can lie.
"""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# u8 x s8 products summed in int32 (VNNI's vpdpbusd, AMX): signed int8 weights lose nothing.
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache  # a many-core machine's cpuinfo is large and generated on every read
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's x86 ``flags`` (empty on other architectures or when unreadable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_weight_type(cpuinfo: Path = CPUINFO) -> str:
    """``s8`` or ``u8``: the int8 weight type whose products this CPU computes without saturating.

    ONNX Runtime multiplies uint8 activations by int8 weights. With VNNI or AMX (and on other
    architectures) the products are summed in int32. An x86 CPU with neither uses AVX2's
    ``vpmaddubsw``, which adds pairs of products into int16 and saturates: on the tiny test
    checkpoint the largest ``|similarity - fp32|`` was 0.027 there with int8 weights, 0.007
    with uint8 weights, whose kernel widens to 16 bits first (docs/performance.md).
    """
    flags = cpu_flags(cpuinfo)
    return "u8" if flags and not flags & EXACT_INT8_FLAGS else "s8"
