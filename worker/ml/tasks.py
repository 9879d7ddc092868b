"""The kinds of model a fine-tune makes: what each is trained to output, how an evaluation is
scored, and the metrics its registered model carries.

- ``classification``: one label per text; softmax over the labels, calibrated by a temperature.
- ``multi_label``: any set of labels per text; a sigmoid per label, a threshold per label
  fitted on the evaluation rows.
- ``regression``: a number per text; trained on standardised targets, scaled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneq.worker.ml.best_model import Evaluation, Scorer
from tuneq.worker.ml.calibration import calibrate
from tuneq.worker.ml.data import Examples
from tuneq.worker.ml.metrics import (
    classification_metrics,
    fit_thresholds,
    multilabel_metrics,
    regression_metrics,
)

PROBLEM_TYPES = {
    "classification": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


@dataclass(frozen=True)
class TargetScale:
    """Regression targets are standardised for training (a new head starts near 0, and a
    1-10 rating would take it many steps to reach); predictions are scaled back."""

    mean: float
    std: float

    @classmethod
    def of(cls, targets: list[float]) -> TargetScale:
        values = np.asarray(targets, dtype=np.float64)
        return cls(float(values.mean()), float(values.std()) or 1.0)

    def restore(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(-1) * self.std + self.mean


@dataclass(frozen=True)
class Task:
    """A job's kind, with what it needs to turn labels into model targets and back."""

    kind: str
    label_names: list[str]
    scale: TargetScale | None = None  # regression only

    @classmethod
    def of(cls, kind: str, label_names: list[str], train: Examples) -> Task:
        scale = TargetScale.of(train.labels) if kind == "regression" else None
        return cls(kind, label_names, scale)

    def model_targets(self, examples: Examples) -> Examples:
        """What the model is trained to output: class ids, 0/1 per label, or standardised
        numbers."""
        if self.kind == "multi_label":
            width = len(self.label_names)
            return Examples(examples.texts, [multi_hot(ids, width) for ids in examples.labels])
        if self.scale is not None:
            mean, std = self.scale.mean, self.scale.std
            return Examples(examples.texts, [(y - mean) / std for y in examples.labels])
        return examples

    def scorer(self) -> Scorer:
        """The metrics of each evaluation pass, from its logits and (model-side) labels."""
        return {
            "classification": self.classification_scores,
            "multi_label": self.multi_label_scores,
            "regression": self.regression_scores,
        }[self.kind]

    def classification_scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        scores = classification_metrics(logits.argmax(axis=-1), labels, self.label_names)
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}

    def multi_label_scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        scores = multilabel_metrics(logits >= 0, labels >= 0.5, self.label_names)  # p >= 0.5
        return {"micro_f1": scores["micro_f1"], "macro_f1": scores["macro_f1"]}

    def regression_scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        assert self.scale is not None
        restore = self.scale.restore
        scores = regression_metrics(restore(logits), restore(labels), self.scale.mean)
        return {key: scores[key] for key in ("mae", "rmse", "spearman")}

    def final_metrics(self, best: Evaluation) -> dict[str, Any]:
        """The registered model's metrics on the evaluation rows, with what inference needs
        to read its outputs: a temperature, thresholds, or the target scale."""
        if self.kind == "multi_label":
            return self.multi_label_metrics(best)
        if self.scale is not None:
            restore = self.scale.restore
            metrics = regression_metrics(
                restore(best.logits), restore(best.labels), self.scale.mean
            )
            metrics["target_scale"] = {"mean": self.scale.mean, "std": self.scale.std}
            return metrics
        metrics = classification_metrics(best.logits.argmax(axis=-1), best.labels, self.label_names)
        metrics["calibration"] = calibrate(best.logits, best.labels).to_dict()
        return metrics

    def unevaluated_metrics(self) -> dict[str, Any]:
        """What inference needs from a model trained on every row, with nothing evaluated:
        the target scale, or thresholds of 0.5 (its temperature stays 1)."""
        if self.kind == "multi_label":
            return {"thresholds": [0.5] * len(self.label_names)}
        if self.scale is not None:
            return {"target_scale": {"mean": self.scale.mean, "std": self.scale.std}}
        return {}

    def multi_label_metrics(self, best: Evaluation) -> dict[str, Any]:
        probabilities = 1 / (1 + np.exp(-best.logits.astype(np.float64)))
        actual = best.labels >= 0.5
        thresholds = fit_thresholds(probabilities, actual)
        metrics = multilabel_metrics(probabilities >= thresholds, actual, self.label_names)
        for name, threshold in zip(self.label_names, thresholds, strict=True):
            metrics["per_class"][name]["threshold"] = float(threshold)
        metrics["thresholds"] = [float(t) for t in thresholds]
        metrics["constant_micro_f1"] = constant_micro_f1(actual)  # judged on the same rows
        return metrics


def multi_hot(ids: list[int], width: int) -> list[float]:
    row = [0.0] * width
    for i in ids:
        row[i] = 1.0
    return row


def constant_micro_f1(actual: np.ndarray) -> float:
    """The micro-F1 of the best constant answer, the same label set for every row: the labels
    most rows carry, or the most common one alone. What a model must beat."""
    shares = actual.mean(axis=0)
    guess = shares >= 0.5
    if not guess.any():
        guess = shares == shares.max()
    predicted = np.broadcast_to(guess, actual.shape)
    return float(multilabel_metrics(predicted, actual, [""] * actual.shape[1])["micro_f1"])
