"""Dropout for fine-tuning on x86-64 CPUs with AVX2: a kernel of tuneq's own.

Why: torch's CPU dropout draws each element with a serial Mersenne twister (MKL's generator is
used only on Intel CPUs); on an AMD EPYC with AVX2 it took 8.5 ns an element, eighty times the
multiply it guards, 5.5 % of a fine-tune step on IMDB reviews. ``cpu_dropout.c`` draws the
same distribution (each element kept with probability 1 - p, kept ones scaled by 1 / (1 - p))
from a counter-based hash of a seed and the element's index, eight at a time, and scales in
the same pass; the backward pass regenerates the mask from the seed, so nothing is stored.
The seed is drawn from torch's generator, so a seeded fine-tune stays reproducible.

Where it runs: :func:`use_for` swaps a model's ``nn.Dropout`` modules for :class:`KernelDropout`
where the CPU has AVX2, a compiler is there (or the kernel was built in advance) and
``TUNEQ_DROPOUT_KERNEL`` is on; a call it does not handle (a GPU tensor, another dtype, p of 0
or 1) goes to torch's dropout. A model's attention dropout stays with torch's attention.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuneq.worker.ml import kernels

KERNEL = kernels.Kernel(
    source=Path(__file__).with_name("cpu_dropout.c"),
    flags=("-O3", "-mavx2", "-mfma", *kernels.LIBRARY),
    cpu_flags=("avx2",),
    setting="dropout_kernel",
    instead="dropout on torch's kernel",
)
unavailable, build = KERNEL.unavailable, KERNEL.build
ENTRY_POINTS = {torch.float32: "tuneq_dropout_f32", torch.bfloat16: "tuneq_dropout_bf16"}
MAX_ELEMENTS = 2**32  # the hash counts elements in 32 bits


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded; None (logged once, with the reason) where it cannot run."""
    loaded = KERNEL.load()
    if loaded is None:
        return None
    for name in ENTRY_POINTS.values():
        run = getattr(loaded, name)
        run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_uint32]
        run.argtypes += [ctypes.c_float, ctypes.c_uint64, ctypes.c_int]
        run.restype = None
    return loaded


def handles(x: torch.Tensor, p: float) -> bool:
    return (
        0.0 < p < 1.0
        and x.device.type == "cpu"
        and x.dtype in ENTRY_POINTS
        and x.numel() < MAX_ELEMENTS
        and library() is not None
    )


def apply(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` with each element kept with probability ``1 - p`` (and scaled by ``1 / (1 - p)``)
    or zeroed, as drawn from ``seed`` (its 64 bits; signed or not): the same seed and shape give
    the same mask."""
    loaded = library()
    assert loaded is not None, "apply() is for what handles() accepts"
    x = x.contiguous()
    y = torch.empty_like(x)
    threshold = min(round(p * 2.0**32), 2**32 - 1)
    run = getattr(loaded, ENTRY_POINTS[x.dtype])
    scale, threads = 1.0 / (1.0 - p), torch.get_num_threads()
    run(x.data_ptr(), y.data_ptr(), x.numel(), threshold, scale, seed % 2**64, threads)
    return y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return apply(x, p, seed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return apply(grad, ctx.p, ctx.seed), None, None  # the same mask and scale, redrawn


def new_seed() -> int:
    """A 64-bit seed from torch's default generator (so ``set_seed`` makes it reproducible),
    signed: the autograd Function takes it as an argument, and a profiler recording its
    arguments (``record_shapes``) can hold a signed 64-bit integer, not an unsigned one above
    2**63."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


class KernelDropout(torch.nn.Dropout):
    """``nn.Dropout`` (same ``p``, same distribution) that runs tuneq's kernel where it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not handles(x, self.p):
            return super().forward(x)
        return _Dropout.apply(x, self.p, new_seed())


def use_for(model: torch.nn.Module) -> int:
    """Swap ``model``'s ``nn.Dropout`` modules for :class:`KernelDropout` where the kernel runs
    here; returns how many it swapped (0 where it cannot run)."""
    if library() is None:
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, KernelDropout(child.p))
                swapped += 1
    return swapped


def in_use(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains its dropout with the kernel: swapped, and on the CPU."""
    on_cpu = all(parameter.device.type == "cpu" for parameter in model.parameters())
    return on_cpu and any(isinstance(module, KernelDropout) for module in model.modules())
