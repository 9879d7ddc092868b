"""Classification metrics from predicted and true label ids (plain NumPy)."""

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
    predicted_count = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros(k), where=predicted_count > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros(k), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(k), where=denominator > 0)
    total = int(matrix.sum())
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
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
