"""What a benchmark ran on: written into every results file, so numbers are compared per CPU kind."""

from __future__ import annotations

import os
import platform
import re


def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels are fast (AVX2, AVX-512 and its bf16/VNNI, AMX)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return []
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")  # fmt: skip
    return [f for f in wanted if f in flags]


def machine_info() -> dict:
    import torch

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                     if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return {"cpu": model, "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}  # fmt: skip
