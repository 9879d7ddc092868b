"""Likely label errors in training data: every training row scored by a model that did not see
it (k folds), then ranked by confident learning (cleanlab) by how unlikely its given label is.

Knows nothing of transformers: the fine-tune passes in how one fold is trained and scored.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tuneq.worker.ml.data import Examples, TrainingData

ISSUES_FILE = "label_issues.csv"
SHOWN = 20  # rows kept in the job's metrics (and so in reports); the file has them all
FoldTrainer = Callable[[Examples, Examples, int], np.ndarray]


def fold_indices(rows: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint sets of row indices covering ``rows``, drawn by a seeded shuffle."""
    order = np.random.default_rng(seed).permutation(rows)
    return [np.sort(part) for part in np.array_split(order, folds)]


def out_of_fold_probabilities(
    examples: Examples, folds: int, seed: int, train_fold: FoldTrainer, report: Any
) -> np.ndarray:
    """Each row's class probabilities from the model trained on the other folds."""
    probabilities: np.ndarray | None = None
    for fold, held in enumerate(fold_indices(len(examples), folds, seed)):
        report({"phase": f"label errors: fold {fold + 1} of {folds}"})
        rest = np.setdiff1d(np.arange(len(examples)), held)
        scores = train_fold(subset(examples, rest), subset(examples, held), fold)
        if probabilities is None:
            probabilities = np.zeros((len(examples), scores.shape[1]))
        probabilities[held] = scores
    assert probabilities is not None
    return probabilities


def subset(examples: Examples, indices: np.ndarray) -> Examples:
    return Examples([examples.texts[i] for i in indices], [examples.labels[i] for i in indices])


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[Any, np.ndarray]:
    """The rows cleanlab judges mislabelled, most likely first, and every row's label quality
    (the probability of its given label: low means suspect)."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = cleanlab_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    return np.asarray(ranked, dtype=np.int64), get_label_quality_scores(labels, probabilities)


def find_label_issues(
    folds: int,
    data: TrainingData,
    train_fold: FoldTrainer,
    out_dir: Path,
    report: Any,
    seed: int,
) -> dict[str, Any]:
    """Rank the training rows whose label is probably wrong; write them all to
    ``out_dir/label_issues.csv`` and return a summary with the first :data:`SHOWN`."""
    labels = np.asarray(data.train.labels, dtype=np.int64)
    probabilities = out_of_fold_probabilities(data.train, folds, seed, train_fold, report)
    ranked, quality = rank_label_issues(labels, probabilities)
    rows = [
        {
            "rank": rank,
            "row": int(index),
            "text": data.train.texts[index],
            "given_label": data.label_names[labels[index]],
            "likely_label": data.label_names[int(probabilities[index].argmax())],
            "given_label_probability": round(float(quality[index]), 4),
        }
        for rank, index in enumerate(ranked, start=1)
    ]
    write_issues(out_dir / ISSUES_FILE, rows)
    return {
        "folds": folds,
        "found": len(rows),
        "rows_checked": len(labels),
        "file": ISSUES_FILE,
        "out_of_fold_accuracy": round(float((probabilities.argmax(1) == labels).mean()), 4),
        "top": [{**row, "text": row["text"][:300]} for row in rows[:SHOWN]],
    }


def write_issues(path: Path, rows: list[dict[str, Any]]) -> None:
    """The ranked rows as CSV; ``row`` is the row's place among the training rows selected."""
    columns = ["rank", "row", "given_label", "likely_label", "given_label_probability", "text"]
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(path)
