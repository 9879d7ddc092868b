"""Attention for fine-tunes on x86-64 CPUs with AVX2, fp32 or under bf16 autocast: a kernel of
tuneq's own, forward and backward, computing in fp32.

Why: on the AMD EPYC with AVX2 only, where tuneq fine-tunes in fp32, torch's attention
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward) took 19 % of a step on IMDB
reviews at 62 GFLOP/s for MiniLM's heads of 32, against 134 for the step's dense products; at
4.51× the recipe, that was what kept the fine-tune from 5×. ``cpu_attention_f32.c`` computes
each (row, head) pair's scores block by block in L2, an exact softmax, and the weighted sum of
values; the forward keeps each query row's log-sum-exp, and the backward recomputes the
probabilities from it, so nothing of the size of the scores is stored (as flash attention).

The same kernel trains under bf16 autocast, where attention gets bf16 inputs: it computes them
in fp32 and returns bf16. On the AMD EPYC with AVX512-BF16, where tuneq's fine-tunes default to
bf16 autocast, torch's bf16 attention, forward and backward, took 32.9 ms for 8 × 256 tokens and
MiniLM's 12 heads of 32, and 3.4 ms for 8 × 24 (short sentences), against 22.1 and 0.7 for the
kernel with its casts (torch's own in fp32: 23.0 and 0.6).

Where it runs: ``cpu_attention.use_fp32_kernel`` switches an fp32 encoder on the CPU to it
(through :mod:`cpu_attention`'s attention implementation, which also holds the bf16 scoring
kernel), for a fine-tune (fp32 or under bf16 autocast) or for fp32 scoring, where the CPU has
AVX2 and FMA, a compiler is there (or the kernel was built in advance),
``TUNEQ_ATTENTION_KERNEL`` is on and, timed on the model's own head shape in this process
(forward and backward for a fine-tune, on the inputs its attention gets; the forward for
scoring), it beats torch's. Every call it does not handle (another dtype, bf16 without
gradients, dropout, causal or biased masks, heads other than 32 or 64) goes to the bf16 kernel
or torch's SDPA as before.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuneq.worker.ml import kernels

KERNEL = kernels.Kernel(
    source=Path(__file__).with_name("cpu_attention_f32.c"),
    flags=("-O3", "-mavx2", "-mfma", *kernels.LIBRARY),
    cpu_flags=("avx2", "fma"),
    setting="attention_kernel",
    instead="fp32 attention on torch's kernel",
)
unavailable, build = KERNEL.unavailable, KERNEL.build
FORWARD, BACKWARD = "tuneq_attention_f32_forward", "tuneq_attention_f32_backward"
FAILURES = {1: "a head size other than 32 or 64", 2: "its buffers could not be allocated"}


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded; None (logged once, with the reason) where it cannot run."""
    loaded = KERNEL.load()
    if loaded is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    strides = ctypes.POINTER(ctypes.c_long)
    for name, pointers in ((FORWARD, 6), (BACKWARD, 10)):
        run = getattr(loaded, name)  # getattr keeps the function object; loaded[name] does not
        run.argtypes = [*[pointer] * pointers, *[size] * 5, *[strides] * 3, ctypes.c_float]
        run.argtypes += [ctypes.c_int]  # threads
        run.restype = ctypes.c_int
    return loaded


def _strides(t: torch.Tensor) -> Any:
    return (ctypes.c_long * 3)(*t.stride()[:3])


def _check(failed: int) -> None:
    if failed:
        raise RuntimeError(f"tuneq's fp32 attention kernel failed: {FAILURES.get(failed, failed)}")


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of fp32 ``[batch, head, row, dim]`` views (any strides but the last) as
    ``[batch, row, head, dim]``, and each query row's log-sum-exp ``[batch, head, row]`` where
    ``with_lse`` (what the backward needs)."""
    loaded = library()
    assert loaded is not None, "forward() is for what cpu_attention.handles_fp32() accepts"
    batch, heads, rows, size = query.shape
    out = torch.empty(batch, rows, heads, size)
    lse = torch.empty(batch, heads, rows) if with_lse else None
    with torch.profiler.record_function("tuneq::attention_f32"):  # named in profiles
        failed = getattr(loaded, FORWARD)(
            query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), _pointer(lse),
            _pointer(keep), batch, heads, rows, key.shape[2], size,
            _strides(query), _strides(key), _strides(value), scale, torch.get_num_threads(),
        )  # fmt: skip
    _check(failed)
    return out, lse


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        keep: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        out, lse = forward(query, key, value, keep, scale, with_lse=True)
        ctx.save_for_backward(query, key, value, out, lse, keep)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative: an error, not a wrong one
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, out, lse, keep = ctx.saved_tensors
        loaded = library()
        assert loaded is not None
        batch, heads, rows, size = query.shape
        keys = key.shape[2]
        grad = grad.contiguous()
        dq = torch.empty(batch, rows, heads, size)
        dk, dv = torch.empty(batch, keys, heads, size), torch.empty(batch, keys, heads, size)
        with torch.profiler.record_function("tuneq::attention_f32_backward"):
            failed = getattr(loaded, BACKWARD)(
                query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(),
                grad.data_ptr(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                _pointer(keep), batch, heads, rows, keys, size,
                _strides(query), _strides(key), _strides(value), ctx.scale,
                torch.get_num_threads(),
            )  # fmt: skip
        _check(failed)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale, keys where keep) v`` for ``[batch, head, row, dim]`` views, as
    ``[batch, row, head, dim]``, differentiable in ``q``, ``k`` and ``v``; ``keep``:
    ``[batch, keys]``, nonzero where a key is attended, or None for all. Inputs of another
    dtype (bf16, under autocast) are computed in fp32 and the result returned in theirs."""
    if keep is not None:
        keep = keep.to(torch.uint8).contiguous()
    dtype = query.dtype
    if dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    if needs_grad(query, key, value):
        out = _Attention.apply(query, key, value, keep, scale)
    else:
        out = forward(query, key, value, keep, scale, with_lse=False)[0]
    return out.to(dtype)  # type: ignore[no-any-return]


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will ask for the gradient of any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@cache
def beats_torch(
    heads: int, size: int, backward: bool = True, inputs: torch.dtype = torch.float32
) -> tuple[bool, float, float]:
    """Whether the kernel is faster than torch's on this machine at ``heads`` heads of
    ``size``, forward and backward together (``backward``) or the forward alone, on ``inputs``
    (bf16: what attention gets under bf16 autocast, which the kernel computes in fp32 and
    torch's in bf16), timed on 8 rows of 256 tokens (best of five alternating calls each),
    with both times in ms."""
    generator = torch.Generator().manual_seed(0)
    shape = (8, 256, heads, size)
    q, k, v = (torch.randn(shape, generator=generator).to(inputs).transpose(1, 2) for _ in "qkv")
    grad = torch.randn(shape, generator=generator).to(inputs)
    keep = torch.ones(8, 256, dtype=torch.bool)
    keep[1:, 200:] = False
    mask = keep[:, None, None, :]

    def leaves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            q.detach().requires_grad_(backward),
            k.detach().requires_grad_(backward),
            v.detach().requires_grad_(backward),
        )

    def ours() -> None:
        out = attention(*leaves(), keep, size**-0.5)
        if backward:
            out.backward(grad)

    def torchs() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(*leaves(), mask).transpose(1, 2)
        if backward:
            out.backward(grad)

    times: dict[Callable[[], None], list[float]] = {ours: [], torchs: []}
    with torch.set_grad_enabled(backward):
        for run in (ours, torchs):
            run()  # warm up
        for _ in range(5):  # alternating, so that a drift of the machine's speed hits both
            for run, taken in times.items():
                started = time.perf_counter()
                run()
                taken.append(time.perf_counter() - started)
    kernel_ms, torch_ms = min(times[ours]) * 1e3, min(times[torchs]) * 1e3
    return kernel_ms < torch_ms, kernel_ms, torch_ms
