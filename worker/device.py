"""What arithmetic this machine does fast: the rule behind ``precision: auto``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU that supports them, or a CPU with
    AVX512-BF16 or AMX (torch also "supports" bf16 on plain AVX-512, but by emulation, slower
    than fp32)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: be conservative
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def training_bf16(precision: str) -> bool:
    """Whether a fine-tune with ``precision`` (auto, fp32, bf16) trains under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16())
