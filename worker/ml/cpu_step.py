"""A fine-tune step's passes over the gradients on the CPU, fewer of them: the Trainer's clip
inside fused AdamW's pass, the word embeddings' gradient made as the rows a batch touched, and
their update reading only the moments of rows a batch has touched.

**Clipping inside the optimizer.** The Trainer clips every step in two passes over all the
gradients before the optimizer's own: their norm, then a rescale in place (``clip_grad_norm_``'s
``_foreach_mul_``, a ``mul_`` per gradient on the CPU, whether the norm is over the limit or
not: 3.5 ms of a 115 ms step on SST-2 sentences on the AVX2 EPYC, ``bench/step_profile.py``).
torch's fused AdamW already divides each gradient by the optimizer's ``grad_scale`` as it reads
it (the hook ``GradScaler`` uses), so the rescale rides on that pass: ``grad_scale = 1 /
clip_coef``. The update is clipping's to within a rounding (dividing by the reciprocal rather
than multiplying), and the gradients are left clipped, as ``clip_grad_norm_`` leaves them.

**The word embeddings' gradient.** A batch of 8 short sentences touches about a hundred of the
vocabulary's 30,522 rows, but the embedding's dense backward makes a fresh gradient of every
row (47 MB for MiniLM, zero-filled, then added into), and the clip's norm reads it all: 5.9 ms
a step by hand. The embedding's backward here is the sparse one (the touched rows, duplicates
summed); the norm is taken over those rows, and the rows are written into a dense gradient
kept from step to step, whose rows of the step before are zeroed first. Fused AdamW then sees
the same dense gradient as before (every other row zero), so the update is unchanged (its
decay of every row's moments included).

**The word embeddings' update.** A row no batch has touched yet has a zero gradient and zero
moments, so AdamW's update of it is its weight decay alone; torch's fused AdamW reads and writes
its gradient and moments all the same. Where the gradient comes as the touched rows, torch's
step skips the embedding matrix and tuneq's kernel (``cpu_adamw_rows``) updates it: the rows
any step has touched in full, the others by their decay, as torch's would to the bit.

Only where nothing else owns ``grad_scale`` or the gradients: the CPU (measured there), torch's
fused AdamW, no loss scaler, one process, clipping on. Elsewhere, or with
``TUNEQ_CLIP_IN_OPTIMIZER=false``, ``TUNEQ_SPARSE_EMBEDDING_GRAD=false`` and
``TUNEQ_EMBEDDING_ROWS_ADAMW=false``, the Trainer clips, the embedding makes its gradient and
torch's AdamW updates it as they always have.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from tuneq.schemas.settings import load_settings
from tuneq.worker.ml import cpu_adamw_rows

FUSED_ADAMW = "adamw_torch_fused"


def lone_cpu_process(accelerator: Any, device: torch.device) -> bool:
    """Training on the CPU, with no loss scaler and no other process to reduce gradients with:
    nothing but the step here touches the gradients between backward and optimizer."""
    return (
        device.type == "cpu"
        and getattr(accelerator, "scaler", None) is None
        and accelerator.num_processes == 1
    )


def folds_into(optimizer: Any, accelerator: Any, device: torch.device) -> bool:
    """Whether the clip can ride on ``optimizer``'s step: torch's AdamW, fused, in a lone CPU
    process, the setting on."""
    return (
        load_settings().clip_in_optimizer
        and lone_cpu_process(accelerator, device)
        and isinstance(optimizer, torch.optim.AdamW)
        and all(group.get("fused") for group in optimizer.param_groups)
    )


def clip_coefficient(norm: float, max_norm: float) -> float:
    """``clip_grad_norm_``'s factor for gradients of ``norm``: at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class SparseEmbeddingGrad:
    """The word embeddings' gradient as the rows a step touched, written into a dense gradient
    kept across steps for the optimizer."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        self.embedding = embedding
        self.dense: torch.Tensor | None = None
        self.rows = torch.zeros(0, dtype=torch.long)  # the rows the last step wrote
        self.came_sparse = False  # whether the last step's gradient did (else it was dense)

    def densify(self) -> torch.Tensor | None:
        """Turn the sparse gradient into the kept dense one (last step's rows zeroed, this
        step's written); returns what the norm must read: the touched rows' gradients
        (duplicates summed), the gradient itself if it came dense (the weight shared with a
        layer that made one), or None before a backward."""
        weight = self.embedding.weight
        grad = weight.grad
        self.came_sparse = grad is not None and grad.is_sparse
        if grad is None or not grad.is_sparse:
            return grad
        grad = grad.coalesce()
        if self.dense is None:
            self.dense = torch.zeros_like(weight)
        rows = grad.indices()[0]
        self.dense.index_fill_(0, self.rows, 0.0)
        self.dense.index_copy_(0, rows, grad.values())
        self.rows = rows
        weight.grad = self.dense
        return grad.values()


class EmbeddingRowsStep:
    """The word embeddings' AdamW step in tuneq's kernel: torch's fused step runs without the
    matrix (its gradient set aside for it, by the optimizer's step hooks), then the kernel
    updates the matrix in full where a step has touched a row, by its decay elsewhere."""

    def __init__(self, optimizer: torch.optim.Optimizer, sparse: SparseEmbeddingGrad) -> None:
        self.optimizer, self.sparse = optimizer, sparse
        self.weight = sparse.embedding.weight
        self.group = groups_of(optimizer, self.weight)[0]
        self.live: torch.Tensor | None = None  # rows any step has touched (moments not zero)
        self.grad: torch.Tensor | None = None
        self.hooks = [
            optimizer.register_step_pre_hook(self.set_grad_aside),
            optimizer.register_step_post_hook(self.step),
        ]

    @staticmethod
    def applies(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> bool:
        """torch's AdamW with the matrix in one group, whose step the kernel computes."""
        groups = groups_of(optimizer, weight)
        return (
            isinstance(optimizer, torch.optim.AdamW)
            and len(groups) == 1
            and cpu_adamw_rows.handles(groups[0], weight)
        )

    def set_grad_aside(self, *_: Any) -> None:
        self.grad, self.weight.grad = self.weight.grad, None

    def step(self, *_: Any) -> None:
        grad, self.grad = self.grad, None
        self.weight.grad = grad
        if grad is None:  # as torch's step skips a parameter without a gradient
            return
        state = self.optimizer.state[self.weight]
        if not state:
            state.update(cpu_adamw_rows.new_state(self.weight))
            self.live = torch.zeros(self.weight.shape[0], dtype=torch.bool)
        elif self.live is None:  # a resumed optimizer's moments
            self.live = cpu_adamw_rows.live_rows(state)
        if self.sparse.came_sparse:
            self.live[self.sparse.rows] = True
        else:  # a dense gradient may touch any row
            self.live.fill_(True)
        scale = getattr(self.optimizer, "grad_scale", None)
        cpu_adamw_rows.update(self.weight, grad, state, self.group, self.live, scale)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def groups_of(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> list[dict[str, Any]]:
    return [g for g in optimizer.param_groups if any(p is weight for p in g["params"])]


class CpuStepTrainer(Trainer):  # type: ignore[misc]
    """A Trainer whose step, on the CPU with fused AdamW, passes over the gradients once less
    for clipping, makes the word embeddings' gradient from the rows a batch touched and updates
    the word embeddings in tuneq's kernel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip_folds: bool | None = None  # decided at the first clip, once the optimizer exists
        self.sparse_embedding: SparseEmbeddingGrad | None = None
        self.embedding_step: EmbeddingRowsStep | None = None  # attached at the first clip
        self.embedding_rows_adamw = False  # whether it was, for the job's record

    def train(self, *args: Any, **kwargs: Any) -> Any:
        model: Any = self.model
        try:
            embedding: Any = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # a model that names no word embeddings
            embedding = None
        if self.sparse_embedding_applies(embedding):
            self.sparse_embedding = SparseEmbeddingGrad(embedding)
            embedding.sparse = True
        try:
            return super().train(*args, **kwargs)
        finally:  # the model and optimizer go on (evaluation, saving, scoring) as they came
            if self.embedding_step is not None:
                self.embedding_step.remove()
                self.embedding_step = None
            if self.sparse_embedding is not None:
                embedding.sparse = False
                self.sparse_embedding = None

    def sparse_embedding_applies(self, embedding: Any) -> bool:
        """Whether the word embeddings' gradient can be made sparse: a trained
        ``nn.Embedding`` in a lone CPU process, fused AdamW, clipping on (the clip turns it
        dense each step), the setting on."""
        return (
            load_settings().sparse_embedding_grad
            and isinstance(embedding, torch.nn.Embedding)
            and not embedding.sparse
            and embedding.weight.requires_grad
            and lone_cpu_process(self.accelerator, self.args.device)
            and getattr(self.args.optim, "value", self.args.optim) == FUSED_ADAMW
            and self.args.max_grad_norm > 0
        )

    def _clip_grad_norm(self, model: Any) -> Any:
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's
        sparse = self.sparse_embedding
        if self.clip_folds is None:
            self.clip_folds = folds_into(optimizer, self.accelerator, self.args.device)
            if sparse is not None and EmbeddingRowsStep.applies(optimizer, sparse.embedding.weight):
                self.embedding_step = EmbeddingRowsStep(optimizer, sparse)
                self.embedding_rows_adamw = True
        rows = sparse.densify() if sparse is not None else None  # before anything reads it
        if not self.clip_folds:
            return super()._clip_grad_norm(model)
        skip = sparse.embedding.weight if sparse is not None else None
        grads = [p.grad for p in model.parameters() if p.grad is not None and p is not skip]
        norm = torch.nn.utils.get_total_norm(grads if rows is None else [*grads, rows], 2.0)
        coefficient = clip_coefficient(float(norm), self.args.max_grad_norm)
        # None: gradients within the norm pass unscaled, and the kernel writes nothing back
        optimizer.grad_scale = torch.tensor(1.0 / coefficient) if coefficient < 1.0 else None
        return norm
