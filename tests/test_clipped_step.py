"""On the CPU with fused AdamW, the Trainer's gradient clipping rides on the optimizer's pass
(``grad_scale``) instead of rescaling every gradient first: the model trains as the Trainer's
own clipping trains it, and the clip still bites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from tuneq.worker.ml.clipped_step import ClipInOptimizerTrainer, clip_coefficient, folds_into

STEPS = 6


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Fixed random token rows with labels: the same batches for every run."""

    def __init__(self, rows: int = 48, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1000, 2000, (rows, length), generator=generator)
        self.labels = torch.randint(0, 2, (rows,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(
    trainer_class: type, model_dir: Path, out: Path, max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], list[float], Any]:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        learning_rate=5e-3,
        weight_decay=0.01,
        max_grad_norm=max_grad_norm,
        optim="adamw_torch_fused",
        use_cpu=True,
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


def test_clipping_in_the_optimizer_trains_as_the_trainers_clipping(
    tiny_model: Path, tmp_path: Path
) -> None:
    clip = 0.05  # below every step's gradient norm here: each step is clipped
    ours, our_norms, trainer = train(ClipInOptimizerTrainer, tiny_model, tmp_path / "a", clip)
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
