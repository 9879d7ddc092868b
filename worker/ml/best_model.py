"""Choosing the model a fine-tune keeps: the best evaluation by the job's metric, early stopping
after a patience without improvement, and a check that the winner learned anything at all.

The Trainer's own ``load_best_model_at_end`` ties evaluation to its checkpoint schedule; tuneq
checkpoints for recovery on its own schedule, so the best weights are kept here instead.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from tuneq.schemas.errors import TrainingDiverged

STATE_FILE = "best.json"
LOGITS_FILE = "logits.npy"


@dataclass
class Evaluation:
    """One pass over the evaluation rows: when, its metrics, and the raw scores behind them."""

    step: int
    metrics: dict[str, float]
    logits: np.ndarray
    labels: np.ndarray


def metric_key(metric: str) -> str:
    """The Trainer's name for a metric in an evaluation's results."""
    return f"eval_{metric}"


LOWER_IS_BETTER = ("loss", "mae")
Scorer = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def is_better(metric: str, candidate: dict[str, float], best: dict[str, float]) -> bool:
    """Whether ``candidate`` beats ``best`` on ``metric``; a tie goes to the lower eval loss,
    so that of two checkpoints that label the same rows alike the more confident one wins."""
    key = metric_key(metric)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    new, old = sign * candidate[key], sign * best[key]
    if new != old:
        return new > old
    return candidate["eval_loss"] < best["eval_loss"]


@dataclass
class BestModel(TrainerCallback):  # type: ignore[misc]
    """Keeps the weights of the best evaluation so far in ``folder`` and stops training after
    ``patience`` evaluations in a row without improvement.

    Its :meth:`compute_metrics` is the Trainer's ``compute_metrics``: it keeps each pass's
    logits so that the winner's metrics need no second pass over the evaluation rows.
    """

    metric: str
    patience: int | None
    folder: Path
    scorer: Scorer  # the metrics of one pass, from its logits and labels
    best: Evaluation | None = None
    last: Evaluation | None = None
    since_best: int = 0
    stop_reason: str | None = None
    pending: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def compute_metrics(self, prediction: Any) -> dict[str, float]:
        logits = np.asarray(prediction.predictions, dtype=np.float32)
        labels = np.asarray(prediction.label_ids)
        self.pending = (logits, labels)
        return self.scorer(logits, labels)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After a resume, the best kept so far counts only if it is no newer than the
        checkpoint: evaluations after it are replayed."""
        self.best = self.restore(state.global_step)
        if self.best is not None:
            later = [
                log
                for log in state.log_history
                if "eval_loss" in log and self.best.step < log["step"] <= state.global_step
            ]
            self.since_best = len(later)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, model: Any = None, **kw: Any
    ) -> None:
        if self.pending is None or not metrics:
            return
        logits, labels = self.pending
        self.pending = None
        scores = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        evaluation = Evaluation(state.global_step, scores, logits, labels)
        self.last = evaluation
        if self.best is None or is_better(self.metric, scores, self.best.metrics):
            self.best, self.since_best = evaluation, 0
            if state.global_step < state.max_steps:  # at the very end the model is in memory
                self.save(evaluation, model)
            return
        self.since_best += 1
        if self.patience is not None and self.since_best >= self.patience:
            control.should_training_stop = True
            value = self.best.metrics[metric_key(self.metric)]
            self.stop_reason = (
                f"{self.metric} did not improve in {self.patience} evaluation(s) after step "
                f"{self.best.step} ({value:.4f})"
            )

    def save(self, evaluation: Evaluation, model: Any) -> None:
        """Write the winner's weights and scores whole: into a new folder, then renamed."""
        staging = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        np.save(staging / LOGITS_FILE, evaluation.logits)
        state = {"step": evaluation.step, "metrics": evaluation.metrics}
        state["labels"] = evaluation.labels.tolist()
        (staging / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(self.folder, ignore_errors=True)
        staging.rename(self.folder)

    def restore(self, resumed_at: int) -> Evaluation | None:
        state_path = self.folder / STATE_FILE
        if resumed_at == 0 or not state_path.is_file():
            return None
        state = json.loads(state_path.read_text())
        if state["step"] > resumed_at:
            return None
        logits = np.load(self.folder / LOGITS_FILE)
        return Evaluation(state["step"], state["metrics"], logits, np.asarray(state["labels"]))

    def load_best_into(self, model: Any, final_step: int) -> Evaluation:
        """Put the winner's weights into ``model`` (unless they are the final ones already)
        and return the winner."""
        if self.best is None:
            raise RuntimeError("no evaluation ran: nothing to choose from")
        if self.best.step != final_step:
            from safetensors.torch import load_file

            weights = load_file(str(self.folder / "model.safetensors"))
            model.load_state_dict(weights)  # strict: a key missing is a bug, not a default
        return self.best

    def summary(self, max_steps: int, final_step: int) -> dict[str, Any]:
        """How the model was chosen, for the job's metrics and the model card."""
        assert self.best is not None
        return {
            "metric": self.metric,
            "best_step": self.best.step,
            "best_metric": round(self.best.metrics[metric_key(self.metric)], 6),
            "final_step": final_step,
            "max_steps": max_steps,
            "stopped_early": self.stop_reason is not None,
            "stop_reason": self.stop_reason or "trained every epoch",
        }


def check_learned(
    evaluation: Evaluation,
    train_loss: float | None,
    train_labels: list[Any],
    spec: Any,
    warnings: list[str],
) -> None:
    """Refuse a model that learned nothing: every evaluation row given one label (or, for
    regression, one value) while the training loss stays at what guessing scores: the label
    shares' entropy, or the variance of the standardised targets (a learning rate too high for
    the model, as 2e-4 is for MiniLM on IMDB)."""
    chance = chance_loss(spec.task, train_labels)
    if spec.task == "regression":
        constant = float(np.std(evaluation.logits)) < 0.02
    elif spec.task == "multi_label":
        constant = len(np.unique(evaluation.logits >= 0, axis=0)) == 1
    else:
        constant = len(np.unique(evaluation.logits.argmax(axis=-1))) == 1
    check_finite(train_loss, spec)
    if train_loss is None or not constant or train_loss < 0.9 * chance:
        return
    guess = "the mean" if spec.task == "regression" else "the label shares"
    same = (
        "value"
        if spec.task == "regression"
        else "label"
        if spec.task == "classification"
        else "label set"
    )
    raise TrainingDiverged(
        f"training did not learn: the training loss ended at {train_loss:.3f}, where guessing "
        f"{guess} scores {chance:.3f}, and every evaluation row got the same "
        f"{same}. "
        f"Lower --learning-rate (this run: {spec.learning_rate:g}) or train longer "
        f"(--epochs, this run: {spec.epochs:g}). No model was registered."
        + "".join(f" Likely why: {warning}." for warning in warnings)
    )


def check_finite(train_loss: float | None, spec: Any) -> None:
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"training diverged: the loss became {train_loss}; lower --learning-rate "
            f"(this run: {spec.learning_rate:g}). No model was registered."
        )


def check_learned_unevaluated(train_loss: float | None, train_labels: list[Any], spec: Any) -> None:
    """With nothing evaluated, only the training loss can tell: refuse one that ended no
    better than guessing (or not a number)."""
    check_finite(train_loss, spec)
    chance = chance_loss(spec.task, train_labels)
    if train_loss is not None and train_loss >= chance:
        raise TrainingDiverged(
            f"training did not learn: the training loss ended at {train_loss:.3f}, no better "
            f"than guessing ({chance:.3f}). Lower --learning-rate (this run: "
            f"{spec.learning_rate:g}) or train longer (--epochs, this run: {spec.epochs:g}). "
            "No model was registered."
        )


def chance_loss(task: str, train_labels: list[Any]) -> float:
    """The training loss of guessing: the label shares' entropy (per label for multi-label),
    or 1, the variance of standardised regression targets."""
    if task == "regression":
        return 1.0
    if task == "multi_label":
        width = 1 + max((i for ids in train_labels for i in ids), default=0)
        hot = np.zeros((len(train_labels), width))
        for row, ids in enumerate(train_labels):
            hot[row, ids] = 1
        shares = np.clip(hot.mean(axis=0), 1e-6, 1)
        entropy = -(shares * np.log(shares) + (1 - shares) * np.log(np.clip(1 - shares, 1e-6, 1)))
        return float(entropy.mean())
    counts = np.bincount(np.asarray(train_labels), minlength=2).astype(np.float64)
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum())
