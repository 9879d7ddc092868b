"""Linear layers on oneDNN for CPU inference.

torch's plain ``nn.Linear`` runs fp32 on MKL, which takes its AVX2 path on AMD processors: on
this project's AMD EPYC a 2048×384×1536 product ran at 210-220 GFLOP/s there and at 500 on
oneDNN with the weight reordered once into oneDNN's own layout (bench/score.py measures both).
Reordering at load time, not on every call, is what the layer here adds; the arithmetic is the
same fp32 (or bf16) product, so labels do not change.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

X86 = ("x86_64", "amd64", "i386", "i686")


def available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear can run ``dtype`` on this machine's CPU."""
    if platform.machine().lower() not in X86 or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(torch.nn.Module):
    """``linear`` with its weight reordered for oneDNN, computing in ``dtype``.

    Inputs of another dtype are cast first, as autocast would cast them for ``nn.Linear``; the
    weight is no longer a parameter (inference only, no gradients)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, gelu: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = dtype
        self.gelu = gelu  # the exact (erf) GELU fused into the product, as oneDNN's post-op
        weight = linear.weight.detach().to(dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        attr, algorithm = ("gelu", "none") if self.gelu else ("none", "")  # "none": erf GELU
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, attr, [], algorithm
        )

    def extra_repr(self) -> str:
        gelu = ", gelu" if self.gelu else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}{gelu}"
        )


def pack_linear_layers(model: Any, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` in ``model`` (on the CPU) by a :class:`PackedLinear` in
    ``dtype``, each feed-forward GELU folded into its product (:func:`fuse_gelu`); returns how
    many layers were replaced, 0 where oneDNN cannot run ``dtype`` here."""
    if not available(dtype):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child, dtype))
                replaced += 1
        fuse_gelu(parent)
    return replaced


def fuse_gelu(block: torch.nn.Module) -> bool:
    """Fold a BERT-family feed-forward block's activation (``dense`` then
    ``intermediate_act_fn``, the exact GELU) into its packed product: the activation then costs
    a pass over the layer's output inside oneDNN instead of a separate kernel over the widest
    tensor in the model (8 % of bf16 scoring time on the Xeon, by profile)."""
    dense, act = getattr(block, "dense", None), getattr(block, "intermediate_act_fn", None)
    if not isinstance(dense, PackedLinear) or dense.gelu or not exact_gelu(act):
        return False
    dense.gelu = True
    block.intermediate_act_fn = torch.nn.Identity()
    return True


def exact_gelu(module: Any) -> bool:
    """Whether ``module`` is the erf GELU (Transformers' ``GELUActivation`` or
    ``nn.GELU()``), not the tanh approximation or another activation."""
    if isinstance(module, torch.nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is (
        torch.nn.functional.gelu
    )
