"""What this machine computes on: the rule behind ``precision: auto``, and GPU memory given
back between jobs."""

from __future__ import annotations

import gc
import logging
import os
import sys
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU that computes them (Ampere and
    later), or a CPU with AVX512-BF16 or AMX. torch also "supports" bf16 by emulation, on plain
    AVX-512 and on older GPUs, slower than fp32; that does not count."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        return cpu_computes_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: be conservative
        return False


@cache
def bf16_hardware() -> str:
    """The kind of hardware bf16 runs on here, as the parity gate keeps its evidence: ``cuda``
    and the GPU's name, ``cpu amx`` or ``cpu avx512_bf16``. Each rounds its own way (tensor
    cores, AMX tiles, AVX-512 dot products), so what one found does not vouch for another."""
    import torch

    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name()}"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return "cpu amx" if "amx_bf16" in flags else "cpu avx512_bf16"


def avoid_cudnn_attention() -> None:
    """On CUDA, attention by any backend but cuDNN's, for this whole process. cuDNN builds a
    graph for every new shape (on an H200, 5 ms of CPU time for 42 µs of GPU work), and
    tuneq's batches, padded per batch and sorted by length when scoring, are nearly all new
    shapes. It serves only fp16 and bf16: bf16 scoring ran 3-4x slower with it, and a bf16
    MiniLM fine-tune trained in 33.9 s against 3.8 s in fp32 (bench/results/finetune_gpu.json,
    first run)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def cpu_computes_bf16(cpuinfo: str) -> bool:
    """Whether the CPU that ``cpuinfo`` (``/proc/cpuinfo``'s text) describes has a bf16
    matmul instruction: AVX512-BF16 or AMX."""
    flags = cpuinfo.split()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def nvidia_gpus() -> int:
    """NVIDIA GPUs the driver lists, read without importing torch or starting CUDA (a worker's
    parent process must do neither before it chooses its GPU)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def training_bf16(precision: str) -> bool:
    """Whether a fine-tune with ``precision`` (auto, fp32, bf16) trains under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16())


def release_gpu_memory(job_id: str) -> None:
    """After a fine-tune in a GPU worker's long-lived process: collect what the job left and
    return the allocator's cached blocks to the GPU, so that the next job, or another process,
    finds the memory free. Models cached for scoring stay. Does nothing where CUDA never
    started."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    gc.collect()
    # cuBLAS keeps a workspace per handle in the caching allocator (tens of MiB on Hopper).
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    torch.cuda.empty_cache()
    log.info(
        "job %s: GPU memory held after it: %.0f MiB allocated, %.0f MiB reserved",
        job_id,
        torch.cuda.memory_allocated() / 2**20,
        torch.cuda.memory_reserved() / 2**20,
    )
