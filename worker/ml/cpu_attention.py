"""Attention for bf16 scoring on CPUs with AVX512-BF16: a kernel of tuneq's own.

Why: in bf16 scoring torch's CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``)
took 39 % of the time on the AMD EPYC with AVX512-BF16 and 45 % on the AMX Xeon, for an eighth
of the model's FLOPs; at MiniLM's heads of 32 it runs at 5-14 % of the bf16 matmul rate. The
kernel in ``cpu_attention_bf16.c`` does the two products with vdpbf16ps straight from registers
(or in AMX tiles where the CPU has them), four query rows per key load, and an fp32 softmax in
between; on the EPYC it took 8.9 ms where torch took 22.3 for 15 reviews of 270 tokens
(``bench/attention.py`` measures both).

How it runs: the C file is compiled once per machine by the system's C compiler into a cache
folder (``TUNEQ_KERNEL_CACHE``, else ``$TUNEQ_DATA_DIR/kernels``) and loaded with ctypes. It is
registered with Transformers as an attention implementation, with a mask function that hands
it the key-padding mask as it is, ``(batch, 1, 1, keys)``, rather than one row per query. A
model is switched to it only where the CPU has AVX512-BF16, a compiler is there, and, timed
on the model's own head shape in this process, it beats torch's kernel; every call it does not
handle (another dtype, gradients, dropout, causal or biased masks, heads other than 32 or 64)
goes to torch's SDPA as before. ``TUNEQ_ATTENTION_KERNEL=off`` turns it off.

The same attention implementation runs fine-tunes (fp32, or under bf16 autocast: bf16 calls
with gradients) and fp32 scoring on tuneq's fp32 kernel (forward and backward;
:mod:`cpu_attention_f32`, which says why), where :func:`use_fp32_kernel` finds it the faster.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuneq.worker.ml import cpu_attention_f32, kernels
from tuneq.worker.ml.kernels import cpu_flags
from tuneq.worker.ml.models import ATTENTION_DROPOUT_KEYS

log = logging.getLogger(__name__)

NAME = "tuneq_cpu"  # the bf16 scoring kernel, the fp32 training one, or SDPA
KERNEL = kernels.Kernel(
    source=Path(__file__).with_name("cpu_attention_bf16.c"),
    flags=(
        "-O3",
        *kernels.AVX512_BF16,
        *("-mamx-tile", "-mamx-bf16"),  # only the AMX entry point runs AMX instructions
        *kernels.LIBRARY,
    ),
    cpu_flags=kernels.AVX512_BF16_CPU,
    setting="attention_kernel",
    instead="bf16 attention on torch's kernel",
)
unavailable, build = KERNEL.unavailable, KERNEL.build
AMX_FLAGS = ("amx_tile", "amx_bf16")
# the kernel's two entry points: both products by vdpbf16ps from registers, or in AMX tiles
ENTRY_POINTS = {"avx512": "tuneq_attention_bf16", "amx": "tuneq_attention_bf16_amx"}
FAILURES = {
    1: "a head size other than 32 or 64",
    2: "its buffers could not be allocated",
    3: "the kernel refused this process the AMX tile registers",
}
HEAD_SIZES = (32, 64)


def variants(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The entry points this CPU runs, best first: AMX where it has AMX-BF16, then AVX-512."""
    flags = cpu_flags(cpuinfo)
    return ("amx", "avx512") if all(flag in flags for flag in AMX_FLAGS) else ("avx512",)


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded; None (logged once, with the reason) where it cannot run."""
    return KERNEL.load()


@cache
def kernel(variant: str | None = None) -> Callable[..., int] | None:
    """The kernel's entry point ``variant`` (default: the best this CPU runs), or None where
    the kernel cannot run here."""
    loaded = library()
    if loaded is None:
        return None
    run = getattr(loaded, ENTRY_POINTS[variant or variants()[0]])
    pointer, size, strides = ctypes.c_void_p, ctypes.c_long, ctypes.POINTER(ctypes.c_long)
    run.argtypes = [*[pointer] * 5, *[size] * 5, strides, strides, strides, ctypes.c_float]
    run.restype = ctypes.c_int
    return run


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    variant: str | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale, keys where keep) v`` for bf16 ``[batch, head, row, dim]`` views
    (any strides but the last), as ``[batch, row, head, dim]``; ``keep``: ``[batch, keys]``,
    nonzero where a key is attended, or None for all. ``variant``: an entry point of
    :data:`ENTRY_POINTS`; default, the best this CPU runs."""
    run = kernel(variant)
    if run is None:
        raise RuntimeError("tuneq's attention kernel is not available here")
    batch, heads, rows, size = query.shape
    out = torch.empty(batch, rows, heads, size, dtype=torch.bfloat16)
    if keep is not None:
        keep = keep.to(torch.uint8).contiguous()

    def strides(t: torch.Tensor) -> Any:
        return (ctypes.c_long * 3)(*t.stride()[:3])

    with torch.profiler.record_function("tuneq::attention_bf16"):  # named in profiles
        failed = run(
            query.data_ptr(),
            key.data_ptr(),
            value.data_ptr(),
            out.data_ptr(),
            None if keep is None else keep.data_ptr(),
            batch,
            heads,
            rows,
            key.shape[2],
            size,
            strides(query),
            strides(key),
            strides(value),
            scale,
        )
    if failed:
        raise RuntimeError(f"tuneq's attention kernel failed: {FAILURES.get(failed, failed)}")
    return out


def padding_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    dtype: torch.dtype,
) -> bool:
    """Whether a call is of the kind tuneq's kernels compute: bidirectional attention without
    dropout over at most a key-padding mask, on ``dtype`` CPU tensors in
    ``[batch, head, row, dim]`` views with heads of 32 or 64."""
    tensors = (query, key, value)
    batch, keys = query.shape[0], key.shape[2]
    return (
        not causal
        and dropout == 0.0
        and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)
        and all(t.dim() == 4 and t.stride(-1) == 1 for t in tensors)
        and query.shape[-1] in HEAD_SIZES
        and key.shape == value.shape
        and key.shape[:2] == query.shape[:2]
        and key.shape[-1] == query.shape[-1]
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (batch, 1, 1, keys)))
    )


def handles(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
) -> bool:
    """Whether the bf16 kernel computes this call exactly as SDPA would."""
    return (
        padding_call(query, key, value, mask, causal, dropout, torch.bfloat16)
        and not cpu_attention_f32.needs_grad(query, key, value)
        and key.shape[2] == query.shape[2]  # as many queries as keys, as tested
    )


def handles_fp32(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
) -> bool:
    """Whether the fp32 kernel (:mod:`cpu_attention_f32`) computes this call as SDPA would, to
    fp32's rounding (any number of queries, gradients included): fp32 calls, and bf16 calls
    that need gradients (training under bf16 autocast: computed in fp32, returned in bf16;
    bf16 calls without gradients are the bf16 kernel's or SDPA's)."""
    dtype = query.dtype
    return (
        (
            dtype == torch.float32
            or (dtype == torch.bfloat16 and cpu_attention_f32.needs_grad(query, key, value))
        )
        and padding_call(query, key, value, mask, causal, dropout, dtype)
        and cpu_attention_f32.library() is not None
    )


def keys_kept(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """A ``(batch, 1, 1, keys)`` padding mask, the kernels' take, as ``(batch, keys)``."""
    return None if mask is None else mask.reshape(query.shape[0], -1)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention interface: this kernel where it :func:`handles` the call, the
    fp32 kernel where :func:`handles_fp32` says so, torch's SDPA (Transformers' own function)
    for everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    plain = not any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (
        plain
        and kernel() is not None
        and handles(query, key, value, attention_mask, causal, dropout)
    ):
        return attention(query, key, value, keys_kept(attention_mask, query), scale), None
    if plain and handles_fp32(query, key, value, attention_mask, causal, dropout):
        keep = keys_kept(attention_mask, query)
        return cpu_attention_f32.attention(query, key, value, keep, scale), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Transformers' mask interface: for a plain bidirectional mask (an encoder's padding), the
    padding mask as ``(batch, 1, 1, keys)`` (None where nothing is padded), which SDPA
    broadcasts too; any other pattern as SDPA's own mask function makes it."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    plain = mask_function is bidirectional_mask_function and q_offset == 0 and kv_offset == 0
    if plain and (attention_mask is None or attention_mask.shape == (batch_size, kv_length)):
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


@cache
def registered() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, key_padding_mask)
    return NAME


@cache
def beats_torch(heads: int, size: int) -> tuple[bool, float, float]:
    """Whether the kernel is faster than torch's on this machine at ``heads`` heads of
    ``size``, timed on 8 rows of 256 tokens (best of five each), with both times in ms."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, heads, 256, size, generator=generator).bfloat16() for _ in range(3))
    keep = torch.ones(8, 256, dtype=torch.bool)
    keep[1:, 200:] = False
    mask = keep[:, None, None, :]

    def best(run: Callable[[], Any]) -> float:
        run()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times) * 1e3

    with torch.inference_mode():
        ours = best(lambda: attention(q, k, v, keep, size**-0.5))
        torchs = best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, mask))
    return ours < torchs, ours, torchs


def head_shape(model: Any) -> tuple[int, int] | None:
    """An SDPA encoder's heads and head size, where this module's kernels take them; None for
    models on another attention implementation (eager, flash, a custom one), decoders, and
    other head sizes."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if (
        getattr(config, "_attn_implementation", None) != "sdpa"
        or getattr(config, "is_decoder", False)
        or not heads
        or not hidden
        or hidden % heads
        or hidden // heads not in HEAD_SIZES
    ):
        return None
    return heads, hidden // heads


def use_fp32_kernel(model: Any, training: bool, autocast: bool = False) -> bool:
    """Switch an fp32 encoder on the CPU from SDPA to tuneq's fp32 kernel where it runs here
    and is the faster: timed forward and backward for a model about to be trained
    (``training``), the forward alone for one that scores; returns whether it did. A model
    to be trained with attention dropout keeps SDPA (the kernel draws none).

    ``autocast``: the model trains under bf16 autocast, so its attention gets bf16 inputs;
    the race is then the kernel (computing them in fp32) against torch's bf16 attention, and
    where the bf16 kernel runs here, it must win its own race too, since it takes the
    evaluation's calls (bf16, no gradients)."""
    shape = head_shape(model)
    if (
        shape is None
        or (training and any(getattr(model.config, key, 0) for key in ATTENTION_DROPOUT_KEYS))
        or model.dtype != torch.float32
        or model.device.type != "cpu"
        or cpu_attention_f32.library() is None
    ):
        return False
    inputs = torch.bfloat16 if autocast else torch.float32
    faster, ours, torchs = cpu_attention_f32.beats_torch(*shape, backward=training, inputs=inputs)
    log.info(
        "%s attention %s, %d heads of %d, 8 × 256 tokens: tuneq's fp32 kernel %.2f ms, "
        "torch's %.2f ms",
        "bf16 autocast" if autocast else "fp32",
        "forward and backward" if training else "forward",
        *shape,
        ours,
        torchs,
    )
    if faster and autocast and kernel() is not None:
        faster = beats_torch(*shape)[0]
    if faster:
        model.set_attn_implementation(registered())
    return faster


def in_use(model: Any) -> bool:
    """Whether ``model`` runs its attention through this module's implementation."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def use_for(model: Any) -> bool:
    """Switch a bf16 encoder on the CPU from SDPA to this kernel where it runs here and is the
    faster; returns whether it did. Models on another attention implementation (eager, flash,
    a custom one) and decoders keep theirs."""
    shape = head_shape(model)
    if (
        shape is None
        or model.dtype != torch.bfloat16
        or model.device.type != "cpu"
        or kernel() is None
    ):
        return False
    faster, ours, torchs = beats_torch(*shape)
    log.info(
        "bf16 attention, %d heads of %d, 8 × 256 tokens: tuneq's kernel %.2f ms, torch's %.2f ms",
        *shape,
        ours,
        torchs,
    )
    if faster:
        model.set_attn_implementation(registered())
    return faster
