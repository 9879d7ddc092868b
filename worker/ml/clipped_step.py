"""The Trainer's gradient clipping, folded into fused AdamW's pass over the gradients on the CPU.

The Trainer clips every step in two passes over all the gradients before the optimizer's own:
their norm, then, where it exceeds ``max_grad_norm``, a rescale in place (``clip_grad_norm_``'s
``_foreach_mul_``, a ``mul_`` per gradient on the CPU: 3.5 ms of a 115 ms step on SST-2
sentences on the AVX2 EPYC, ``bench/step_profile.py``). torch's fused AdamW already divides each
gradient by the optimizer's ``grad_scale`` as it reads it (the hook ``GradScaler`` uses), so the
rescale rides on that pass: ``grad_scale = 1 / clip_coef``. The update is clipping's to within
a rounding (dividing by the reciprocal rather than multiplying), and the gradients are left
clipped, as ``clip_grad_norm_`` leaves them.

Only where nothing else owns ``grad_scale``: the CPU (measured there), torch's fused AdamW, no
loss scaler, one process. Elsewhere, or with ``TUNEQ_CLIP_IN_OPTIMIZER=false``, the Trainer
clips as it always has.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from tuneq.schemas.settings import load_settings


def folds_into(optimizer: Any, accelerator: Any, device: torch.device) -> bool:
    """Whether the clip can ride on ``optimizer``'s step: torch's AdamW, fused, on the CPU,
    with no loss scaler and no other process to reduce gradients with, the setting on."""
    return (
        load_settings().clip_in_optimizer
        and device.type == "cpu"
        and isinstance(optimizer, torch.optim.AdamW)
        and all(group.get("fused") for group in optimizer.param_groups)
        and getattr(accelerator, "scaler", None) is None
        and accelerator.num_processes == 1
    )


def clip_coefficient(norm: float, max_norm: float) -> float:
    """``clip_grad_norm_``'s factor for gradients of ``norm``: at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class ClipInOptimizerTrainer(Trainer):  # type: ignore[misc]
    """A Trainer whose clip (on the CPU, with fused AdamW) costs the norm only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip_folds: bool | None = None  # decided at the first clip, once the optimizer exists

    def _clip_grad_norm(self, model: Any) -> Any:
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's
        if self.clip_folds is None:
            self.clip_folds = folds_into(optimizer, self.accelerator, self.args.device)
        if not self.clip_folds:
            return super()._clip_grad_norm(model)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        coefficient = clip_coefficient(float(norm), self.args.max_grad_norm)
        # None: gradients within the norm pass unscaled, and the kernel writes nothing back
        optimizer.grad_scale = torch.tensor(1.0 / coefficient) if coefficient < 1.0 else None
        return norm
