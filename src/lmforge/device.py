"""Choosing the device, the precision and the number of CPU threads."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from lmforge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be available here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "Device cuda was asked for but no CUDA GPU is available; use the cpu device.",
            settings=("device",),
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "Device mps was asked for but is not available; use the cpu device.", settings=("device",)
        )
    return device


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision: 'auto' is bf16 where the hardware does it fast, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"Unknown dtype {name!r}; use auto, float32, bfloat16 or float16.")
    if name == "float16" and device.type == "cpu":
        raise UserError(
            "float16 training is for GPUs; on a CPU use the dtype bfloat16 or float32.", settings=("dtype",)
        )
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matmuls when dtype is not float32; weights stay float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's matmul units, so they do not help)."""
    try:
        pairs = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads if threads > 0 else physical_cores())


def machine_key() -> str:
    """The CPU model, its vector flags and the torch version: timings are valid for this triple."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
    return f"{model} [{' '.join(f for f in wanted if f in flags)}] torch {torch.__version__}"
