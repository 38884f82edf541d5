"""The machine a figure was measured on: lscpu's model and the ISA flags that decide INT8 arithmetic and speed.

Benchmarks, the latency budget and verify record `machine()` beside every timing. Standard library only (it runs
in a bundle's or probe folder's torch-free runtime).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 10
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def run_command(cmd: list[str]) -> str | None:
    """stdout of `cmd`, or None when it is missing, fails or runs past PROBE_TIMEOUT_S."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def cpu_info() -> dict[str, Any]:
    """CPU model name, core count and the flags that matter here (AVX-512, VNNI, AMX)."""
    fields = {}
    for line in (run_command(["lscpu"]) or "").splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = fields.get("Model name") or next(iter(re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)), "")
    flags = set((fields.get("Flags") or next(iter(re.findall(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)), "")).split())
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def int8_dot_product(flags: list[str]) -> str:
    """How ONNX Runtime's U8S8 kernels multiply on a CPU with these flags: 'amx' (AMX-INT8 tiles) and 'vnni'
    (VPDPBUSD) accumulate u8 x s8 products exactly in int32; 'vpmaddubsw' (AVX2, AVX-512 without VNNI) first sums
    each pair of products into a saturating int16, exact only while a pair stays within 32767 (7-bit weights);
    'unknown' elsewhere (no AVX2, or not x86)."""
    if "amx_int8" in flags:
        return "amx"
    if {"avx512_vnni", "avx_vnni"} & set(flags):
        return "vnni"
    return "vpmaddubsw" if "avx2" in flags else "unknown"



def machine() -> dict[str, Any]:
    """lscpu's model name and the ISA flags that matter (AVX2, AVX-512, VNNI, AMX), the cores, the platform."""
    cpu = cpu_info()
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cores": cpu["cores"], "platform": platform.platform()}
