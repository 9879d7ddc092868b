"""AdamW for the word embeddings on x86-64 CPUs: a kernel of tuneq's own that updates the rows
no batch has touched yet by their weight decay alone.

Why: a row of the word embeddings that no batch has touched has a zero gradient and zero
moments, and AdamW's update of it is its weight decay, ``p * (1 - lr * wd)``; torch's fused
AdamW still reads its gradient and both moments and writes them back, 28 bytes an element
where the decay needs 8, for every row, every step. A fine-tune on 2,000 SST-2 sentences
touches 16 % of MiniLM's 30,522 rows in all (IMDB's 1,000 reviews 46 %), and the embedding
matrix is half of the model's parameters: by hand on the AVX512-BF16 EPYC, the matrix's update
took 5.7 ms with torch's kernel and 2.6 ms with this one, 16 % of its rows live.

:func:`update` is torch's fused AdamW step (ADAMW mode) for one parameter, given which rows
are live (touched at least once, so their moments may be non-zero); the live rows get torch's
arithmetic, operation for operation (``cpu_adamw_rows.c``), equal to the bit on the CPUs
tested. ``tuneq.worker.ml.cpu_step`` uses it where the word embeddings' gradient comes as the
rows a batch touched, with ``TUNEQ_EMBEDDING_ROWS_ADAMW`` on (the default) and where the CPU
has AVX2 and a compiler is there (or the kernel was built in advance).
"""

from __future__ import annotations

import ctypes
import math
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuneq.worker.ml import kernels

KERNEL = kernels.Kernel(
    source=Path(__file__).with_name("cpu_adamw_rows.c"),
    # -ffp-contract=off: the live rows' arithmetic is torch's, rounding for rounding
    flags=("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fno-math-errno", *kernels.LIBRARY),
    cpu_flags=("avx2", "fma"),
    setting="embedding_rows_adamw",
    instead="the word embeddings on torch's AdamW",
)
unavailable, build = KERNEL.unavailable, KERNEL.build


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded; None (logged once, with the reason) where it cannot run."""
    loaded = KERNEL.load()
    if loaded is None:
        return None
    run = loaded.tuneq_adamw_rows
    run.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2 + [ctypes.c_float] * 7
    run.argtypes += [ctypes.c_void_p, ctypes.c_int]
    run.restype = None
    return loaded


def handles(group: dict[str, Any], param: torch.Tensor) -> bool:
    """Whether :func:`update` computes what torch's AdamW would for ``param`` in ``group``:
    fused AdamW without amsgrad, maximize or a differentiable step, on a contiguous fp32
    matrix on the CPU, the kernel loaded."""
    return (
        group.get("fused") is True
        and group.get("decoupled_weight_decay", True)  # AdamW's (Adam's own is False)
        and not group.get("amsgrad")
        and not group.get("maximize")
        and not group.get("differentiable")
        and not group.get("capturable")
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and param.dim() == 2
        and param.is_contiguous()
        and library() is not None
    )


def new_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state torch's fused AdamW makes for ``param`` on its first step."""
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def live_rows(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows whose moments are not all zero (a resumed optimizer's): the rows to update in
    full."""
    nonzero = (state["exp_avg"] != 0) | (state["exp_avg_sq"] != 0)
    return nonzero.any(dim=1)


def update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    group: dict[str, Any],
    live: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One step of torch's fused AdamW for ``param`` (``state`` and ``group`` as the optimizer
    keeps them; ``grad_scale`` divides the gradient, as the optimizer's attribute of that name
    does), where the rows not in ``live`` (bool, one per row) have a zero gradient and zero
    moments. Advances ``state["step"]``."""
    loaded = library()
    assert loaded is not None, "update() is for what handles() accepts"
    assert grad.is_contiguous() and grad.shape == param.shape and grad.dtype == param.dtype
    state["step"] += 1
    step = float(state["step"])
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    # torch's constants: computed in double, rounded to float where the kernel reads them
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    scale = None
    if grad_scale is not None:
        scale = grad_scale.to(torch.float32).reshape(1)
    flags = live.to(torch.uint8).contiguous()
    with torch.profiler.record_function("tuneq::adamw_rows"):  # named in profiles
        loaded.tuneq_adamw_rows(
            param.data_ptr(),
            grad.data_ptr(),
            state["exp_avg"].data_ptr(),
            state["exp_avg_sq"].data_ptr(),
            flags.data_ptr(),
            param.shape[0],
            param.shape[1],
            1 - lr * group["weight_decay"],
            -(lr / bias_correction1),
            math.sqrt(bias_correction2),
            group["eps"],
            1 - beta1,
            beta2,
            1 - beta2,
            None if scale is None else scale.data_ptr(),
            torch.get_num_threads(),
        )
