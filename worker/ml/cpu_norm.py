"""The residual add and LayerNorm that end each half of a BERT-family layer, fused, for bf16
scoring on CPUs with AVX512-BF16: a kernel of tuneq's own.

Why: with the attention kernel in place, bf16 scoring on the AMX Xeon spent 12 % of its
operator time in ``aten::add`` and ``aten::native_layer_norm`` (``bench/attention.py``), two
passes over the activations for a few operations per element. The kernel in
``cpu_norm_bf16.c`` reads the block's output and its input once and writes the normalised sum,
2.1-2.3× faster than torch's add then LayerNorm on 4,096 and 8,192 rows of 384 there, equal
to it bit for bit on all but about 2 elements in 100,000 (the sum is rounded to bf16 first, as
torch's separate add rounds it).

Where: blocks whose forward is, instruction for instruction, BERT's ``BertSelfOutput`` /
``BertOutput`` (``LayerNorm(dropout(dense(h)) + input)``, copied as such into RoBERTa, XLM-R,
ELECTRA and others) in a bf16 model on the CPU get a forward that calls the kernel; in training
mode, or for a call it does not handle, the block runs its own forward. Built and loaded as
the attention kernel is (``kernels.py``); ``TUNEQ_NORM_KERNEL=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import types
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tuneq.worker.ml import kernels
from tuneq.worker.ml.models import forward_signature

log = logging.getLogger(__name__)

KERNEL = kernels.Kernel(
    source=Path(__file__).with_name("cpu_norm_bf16.c"),
    flags=("-O3", *kernels.AVX512_BF16, *kernels.LIBRARY),
    cpu_flags=kernels.AVX512_BF16_CPU,
    setting="norm_kernel",
    instead="residual add and LayerNorm on torch's kernels",
)
unavailable, build = KERNEL.unavailable, KERNEL.build
WIDEST = 4096  # the C file's WIDEST


@cache
def kernel() -> Any:
    """The kernel's entry point, or None (logged once, with the reason) where it cannot run."""
    loaded = KERNEL.load()
    if loaded is None:
        return None
    run = loaded.tuneq_add_layer_norm_bf16
    pointer, size = ctypes.c_void_p, ctypes.c_long
    run.argtypes = [*[pointer] * 5, size, size, ctypes.c_float]
    run.restype = ctypes.c_int
    return run


def handles(x: torch.Tensor, residual: torch.Tensor, norm: Any) -> bool:
    """Whether the kernel computes ``norm(x + residual)`` for these operands: bf16 on the CPU,
    the same shape, no gradients, a LayerNorm with weight and bias over the last dimension (a
    multiple of 16, at most 4,096)."""
    width = x.shape[-1]
    return (
        isinstance(norm, torch.nn.LayerNorm)
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (width,)
        and x.shape == residual.shape
        and width % 16 == 0
        and width <= WIDEST
        and all(t.dtype == torch.bfloat16 for t in (x, residual, norm.weight, norm.bias))
        and all(t.device.type == "cpu" for t in (x, residual, norm.weight))
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
    )


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm
) -> torch.Tensor:
    """``norm(x + residual)`` by the kernel (see :func:`handles` for what it takes)."""
    run = kernel()
    if run is None:
        raise RuntimeError("tuneq's norm kernel is not available here")
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    weight, bias = norm.weight.detach().contiguous(), norm.bias.detach().contiguous()
    width = x.shape[-1]
    with torch.profiler.record_function("tuneq::add_layer_norm_bf16"):  # named in profiles
        failed = run(
            x.data_ptr(),
            residual.data_ptr(),
            weight.data_ptr(),
            bias.data_ptr(),
            out.data_ptr(),
            x.numel() // width,
            width,
            norm.eps,
        )
    if failed:
        raise RuntimeError(f"tuneq's norm kernel refused a width of {width}")
    return out


@cache
def bert_residual_forwards() -> frozenset[tuple[Any, ...]]:
    """The instructions, names and constants of BERT's residual blocks' forwards, which the
    fused forward stands in for."""
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

    return frozenset(forward_signature(block) for block in (BertSelfOutput, BertOutput))


def is_bert_residual_block(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is BERT's ``LayerNorm(dropout(dense(h)) + input)``, compared
    instruction by instruction (a block that does anything else keeps its own)."""
    forward = forward_signature(type(module))
    return (
        forward is not None
        and forward in bert_residual_forwards()
        and isinstance(getattr(module, "LayerNorm", None), torch.nn.LayerNorm)
    )


def fused_forward(self: Any, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> Any:
    """A BERT residual block's forward with its add and LayerNorm in the kernel (in eval mode,
    where dropout does nothing); its own forward otherwise."""
    own = type(self).forward
    if self.training:
        return own(self, hidden_states, input_tensor)
    projected = self.dense(hidden_states)
    if not handles(projected, input_tensor, self.LayerNorm):
        return self.LayerNorm(self.dropout(projected) + input_tensor)
    return add_layer_norm(projected, input_tensor, self.LayerNorm)


def use_for(model: Any) -> int:
    """Give every BERT residual block of a bf16 model on the CPU the fused forward, where the
    kernel runs here; returns how many blocks got it."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return 0
    blocks = [m for m in model.modules() if is_bert_residual_block(m)]
    if not blocks or kernel() is None:
        return 0
    for block in blocks:
        block.forward = types.MethodType(fused_forward, block)
    log.info("residual add and LayerNorm on tuneq's kernel in %d blocks", len(blocks))
    return len(blocks)
