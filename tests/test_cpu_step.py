"""On the CPU with fused AdamW, a fine-tune step passes over the gradients fewer times: the
Trainer's clip rides on the optimizer's pass (``grad_scale``), and the word embeddings' gradient
is made from the rows a batch touched. The model trains as the Trainer's own step trains it,
and the clip still bites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from tuneq.worker.ml import cpu_adamw_rows, cpu_step
from tuneq.worker.ml.cpu_step import CpuStepTrainer, clip_coefficient, folds_into

STEPS = 6


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Fixed random token rows with labels, some padded (token 0, the embedding's padding
    row): the same batches for every run."""

    def __init__(self, rows: int = 48, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1000, 1400, (rows, length), generator=generator)
        self.mask = torch.ones(rows, length, dtype=torch.long)
        for i in range(0, rows, 3):  # every third row ends in padding
            self.ids[i, -4:] = 0
            self.mask[i, -4:] = 0
        self.labels = torch.randint(0, 2, (rows,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def train(
    trainer_class: type, model_dir: Path, out: Path, max_grad_norm: float, bf16: bool = False
) -> tuple[dict[str, torch.Tensor], list[float], Any]:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    assert model.get_input_embeddings().padding_idx == 0
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        learning_rate=5e-3,
        weight_decay=0.01,  # decays every embedding row, touched or not
        max_grad_norm=max_grad_norm,
        optim="adamw_torch_fused",
        use_cpu=True,
        bf16=bf16,  # autocast, as fine-tunes on a CPU with native bf16 train by default
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=Rows())
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return weights, norms, trainer


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture
def sparse_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, list[int]]]:
    """Each densified step's embedding gradient: whether it came sparse, and its rows."""
    seen: list[tuple[bool, list[int]]] = []
    densify = cpu_step.SparseEmbeddingGrad.densify

    def spy(self: cpu_step.SparseEmbeddingGrad) -> torch.Tensor | None:
        grad = self.embedding.weight.grad
        rows = grad.coalesce().indices()[0].tolist() if grad.is_sparse else []
        seen.append((grad.is_sparse, rows))
        return densify(self)

    monkeypatch.setattr(cpu_step.SparseEmbeddingGrad, "densify", spy)
    return seen


def test_the_lean_step_trains_as_the_trainers_step(
    tiny_model: Path, tmp_path: Path, sparse_steps: list[tuple[bool, list[int]]]
) -> None:
    clip = 0.05  # below every step's gradient norm here: each step is clipped
    ours, our_norms, trainer = train(CpuStepTrainer, tiny_model, tmp_path / "a", clip)
    theirs, their_norms, _ = train(Trainer, tiny_model, tmp_path / "b", clip)
    unclipped, _, _ = train(Trainer, tiny_model, tmp_path / "c", 1e9)

    assert len(our_norms) == STEPS and min(our_norms) > clip
    # the norm the Trainer logs is the one its own clipping logs
    assert max(abs(a - b) / b for a, b in zip(our_norms, their_norms, strict=True)) < 1e-4
    assert largest_difference(ours, theirs) < 1e-5
    # the clip mattered: without it the same steps go elsewhere
    assert largest_difference(unclipped, theirs) > 1e-3
    optimizer = trainer.optimizer.optimizer  # and the clip did ride on the optimizer
    assert folds_into(optimizer, trainer.accelerator, trainer.args.device)
    assert isinstance(optimizer.grad_scale, torch.Tensor)
    # every step's embedding gradient came as the rows its batch touched, padding not among them
    assert len(sparse_steps) == STEPS
    assert all(sparse and 0 < len(rows) <= 8 * 12 for sparse, rows in sparse_steps)
    assert all(0 not in rows and min(rows) >= 1000 for _, rows in sparse_steps)
    assert not trainer.model.get_input_embeddings().sparse  # put back after training


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_sparse_embedding_gradient_changes_no_update(
    tiny_model: Path,
    tmp_path: Path,
    sparse_steps: list[tuple[bool, list[int]]],
    monkeypatch: pytest.MonkeyPatch,
    bf16: bool,
) -> None:
    """Against the same Trainer with the dense embedding backward: the same parameters, every
    embedding row (the decayed untouched ones too), and the same norms."""
    sparse, sparse_norms, _ = train(CpuStepTrainer, tiny_model, tmp_path / "a", 0.05, bf16)
    assert len(sparse_steps) == STEPS
    monkeypatch.setenv("TUNEQ_SPARSE_EMBEDDING_GRAD", "false")
    dense, dense_norms, _ = train(CpuStepTrainer, tiny_model, tmp_path / "b", 0.05, bf16)
    assert len(sparse_steps) == STEPS  # the dense run never densified
    name = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(sparse[name], dense[name], rtol=0, atol=1e-6)
    assert largest_difference(sparse, dense) < 1e-6
    assert max(abs(a - b) / b for a, b in zip(sparse_norms, dense_norms, strict=True)) < 1e-5


def test_the_clip_coefficient_is_clip_grad_norms() -> None:
    grads = [torch.randn(30, 7) * 4, torch.randn(11) * 4]
    norm = float(torch.nn.utils.get_total_norm(grads, 2.0))
    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(parameters, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    factor = clip_coefficient(norm, 1.0)
    assert factor < 1.0
    for g, p in zip(grads, parameters, strict=True):
        torch.testing.assert_close(g * factor, p.grad)
    assert clip_coefficient(0.5, 1.0) == 1.0  # within the norm: untouched


def test_elsewhere_the_trainer_clips_as_always(monkeypatch: pytest.MonkeyPatch) -> None:
    class Accelerator:
        scaler = None
        num_processes = 1

    weight = torch.nn.Parameter(torch.zeros(3))
    cpu = torch.device("cpu")
    assert folds_into(torch.optim.AdamW([weight], fused=True), Accelerator(), cpu)
    assert not folds_into(torch.optim.AdamW([weight]), Accelerator(), cpu)  # not fused
    assert not folds_into(torch.optim.SGD([weight]), Accelerator(), cpu)
    assert not folds_into(
        torch.optim.AdamW([weight], fused=True), Accelerator(), torch.device("cuda")
    )
    monkeypatch.setenv("TUNEQ_CLIP_IN_OPTIMIZER", "false")
    assert not folds_into(torch.optim.AdamW([weight], fused=True), Accelerator(), cpu)
    monkeypatch.delenv("TUNEQ_CLIP_IN_OPTIMIZER")
    Accelerator.scaler = object()
    assert not folds_into(torch.optim.AdamW([weight], fused=True), Accelerator(), cpu)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_embedding_rows_kernel_changes_no_update(
    tiny_model: Path,
    tmp_path: Path,
    sparse_steps: list[tuple[bool, list[int]]],
    monkeypatch: pytest.MonkeyPatch,
    bf16: bool,
) -> None:
    """The word embeddings updated by tuneq's kernel every step, against torch's AdamW
    updating them (``TUNEQ_EMBEDDING_ROWS_ADAMW=false``): the same parameters, every embedding
    row included; the rows with moments are exactly those the steps touched."""
    if cpu_adamw_rows.library() is None:
        pytest.skip(f"the kernel cannot run here: {cpu_adamw_rows.unavailable()}")
    updated: list[int] = []
    update = cpu_adamw_rows.update

    def spy(param: torch.Tensor, *args: Any) -> None:
        updated.append(param.shape[0])
        update(param, *args)

    monkeypatch.setattr(cpu_adamw_rows, "update", spy)
    ours, our_norms, trainer = train(CpuStepTrainer, tiny_model, tmp_path / "a", 0.05, bf16)
    vocabulary = trainer.model.get_input_embeddings().weight.shape[0]
    assert updated == [vocabulary] * STEPS
    assert trainer.embedding_step is None  # its hooks removed after training
    optimizer = trainer.optimizer.optimizer
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    state = optimizer.state[trainer.model.get_input_embeddings().weight]
    assert float(state["step"]) == STEPS
    with_moments = set(cpu_adamw_rows.live_rows(state).nonzero()[:, 0].tolist())
    assert with_moments == {row for _, rows in sparse_steps for row in rows}

    monkeypatch.setenv("TUNEQ_EMBEDDING_ROWS_ADAMW", "false")
    cpu_adamw_rows.library.cache_clear()
    try:
        theirs, their_norms, _ = train(CpuStepTrainer, tiny_model, tmp_path / "b", 0.05, bf16)
    finally:
        cpu_adamw_rows.library.cache_clear()
    assert len(updated) == STEPS  # torch's AdamW did the second run's
    name = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
    assert largest_difference(ours, theirs) < 1e-6
    assert max(abs(a - b) / b for a, b in zip(our_norms, their_norms, strict=True)) < 1e-5
