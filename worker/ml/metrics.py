"""Metrics of classifiers, multi-label models and regressors, from predictions and truth
(plain NumPy)."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(
    predicted: np.ndarray, actual: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix has one row per true label and one column per predicted label.
    """
    k = len(label_names)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    true_positive = np.diag(matrix).astype(np.float64)
    total = int(matrix.sum())
    f1, per_class = per_class_scores(
        true_positive, matrix.sum(axis=0), matrix.sum(axis=1), label_names
    )
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def regression_metrics(
    predicted: np.ndarray, actual: np.ndarray, constant: float
) -> dict[str, float]:
    """MAE, RMSE and Spearman's rank correlation of ``predicted`` against ``actual``, and the MAE
    of always predicting ``constant`` (the training mean): what a model must beat."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    errors = predicted - actual
    return {
        "mae": float(np.abs(errors).mean()),
        "rmse": float(np.sqrt((errors**2).mean())),
        "spearman": spearman(predicted, actual),
        "constant_mae": float(np.abs(constant - actual).mean()),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks, tied values sharing their mean
    rank; 0 where either side is constant (no order to agree with)."""
    ranks_a, ranks_b = average_ranks(a), average_ranks(b)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return 0.0
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # candidates for a label's threshold


def multilabel_metrics(
    predicted: np.ndarray, actual: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """Micro- and macro-F1, the share of rows whose whole label set is right, and per-label
    precision, recall, F1 and support, from boolean ``rows × labels`` matrices."""
    predicted, actual = predicted.astype(bool), actual.astype(bool)
    true_positive = (predicted & actual).sum(axis=0).astype(np.float64)
    predicted_count, support = predicted.sum(axis=0), actual.sum(axis=0)
    f1, per_class = per_class_scores(true_positive, predicted_count, support, label_names)
    micro = f1_scores(true_positive.sum(), predicted_count.sum(), support.sum())
    return {
        "micro_f1": float(micro),
        "macro_f1": float(f1.mean()),
        "subset_accuracy": float((predicted == actual).all(axis=1).mean()),
        "per_class": per_class,
    }


def per_class_scores(
    true_positive: np.ndarray, predicted: np.ndarray, support: np.ndarray, names: list[str]
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Each label's F1 (as an array, for the macro mean) and its precision, recall, F1 and
    support, from its true positives, predictions and true rows."""
    zeros = np.zeros(len(names))
    precision = np.divide(true_positive, predicted, out=zeros.copy(), where=predicted > 0)
    recall = np.divide(true_positive, support, out=zeros.copy(), where=support > 0)
    f1 = f1_scores(true_positive, predicted, support)
    per_class = {
        name: {
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return f1, per_class


def f1_scores(true_positive: Any, predicted: Any, actual: Any) -> Any:
    """F1 = 2·TP / (predicted + actual), 0 where both are 0; element-wise on arrays."""
    denominator = np.asarray(predicted + actual, dtype=np.float64)
    return np.divide(
        2 * np.asarray(true_positive, dtype=np.float64),
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )


def fit_thresholds(probabilities: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per label, the threshold among :data:`THRESHOLDS` with the best F1 on these rows (of
    equal ones, the nearest to 0.5, so that a label with little evidence keeps the neutral one)."""
    actual = actual.astype(bool)
    chosen = np.full(probabilities.shape[1], 0.5)
    for label in range(probabilities.shape[1]):
        scores = probabilities[:, label]
        truth = actual[:, label]
        f1 = [
            float(f1_scores((scores >= t)[truth].sum(), (scores >= t).sum(), truth.sum()))
            for t in THRESHOLDS
        ]
        best = max(f1)
        ties = [t for t, value in zip(THRESHOLDS, f1, strict=True) if value == best]
        chosen[label] = min(ties, key=lambda t: abs(t - 0.5))
    return chosen
