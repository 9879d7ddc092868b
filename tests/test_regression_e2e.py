"""A regression job end to end: a numeric target trains, registers, predicts and scores a file
through a real worker, and beats predicting the mean on rows it never saw."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    finetune_and_show,
    invoke_cli,
    queue_name,
    write_csv,
)
from tuneq.schemas.errors import DataError
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml.data import load_training_data


def rated_reviews(n: int, seed: int) -> list[tuple[str, float]]:
    """Reviews whose rating (1-9) is two points per positive word among four sentiment words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.randint(0, 4)
        words = rng.choices(POSITIVE, k=positive) + rng.choices(NEGATIVE, k=4 - positive)
        words += rng.choices(FILLER, k=5)
        rng.shuffle(words)
        rows.append((" ".join(words), 1.0 + 2 * positive))
    return rows


def test_a_regression_job_trains_predicts_and_scores(
    env, start_worker, tiny_model: Path, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    train = write_csv(tmp_path / "ratings.csv", ["text", "rating"], rated_reviews(300, seed=1))
    job = finetune_and_show(
        env, "--data", str(train), "--model", str(tiny_model), "--queue", queue,
        "--task", "regression", "--label-column", "rating", "--name", "tiny-rating",
        "--epochs", "12", "--learning-rate", "0.002", "--batch-size", "16",
    )  # fmt: skip
    metrics = job["metrics"]
    assert metrics["training"]["metric"] == "mae", "the regression default"
    assert metrics["mae"] < 0.6 * metrics["constant_mae"], metrics
    assert metrics["spearman"] > 0.7, metrics
    assert "accuracy" not in metrics and "calibration" not in metrics
    assert job["model"]["labels"] == ["rating"]
    shown = invoke_cli(env, "show", job["id"]).stdout
    assert "MAE" in shown and "predicting the mean" in shown

    predicted = json.loads(
        invoke_cli(env, "predict", "tiny-rating", "superb brilliant loved", "--json").stdout
    )
    assert set(predicted) == {"text", "value"} and isinstance(predicted["value"], float)

    held_out = rated_reviews(200, seed=2)  # rows neither training nor evaluation saw
    source = write_csv(tmp_path / "new.csv", ["text", "truth"], held_out)
    output = tmp_path / "scored.csv"
    scored = invoke_cli(
        env, "score", "tiny-rating", str(source), "--output", str(output), "--queue", queue,
        "--wait",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["text"] for r in rows] == [text for text, _ in held_out]
    assert set(rows[0]) == {"text", "truth", "value"}
    values = np.array([float(r["value"]) for r in rows])
    truth = np.array([float(r["truth"]) for r in rows])
    train_mean = float(np.mean([rating for _, rating in rated_reviews(300, seed=1)]))
    constant = np.abs(truth - train_mean).mean()
    assert np.abs(values - truth).mean() < 0.6 * constant, "beats predicting the mean"


def test_a_regression_target_must_be_numeric(tmp_path: Path) -> None:
    rows = [("good", "8"), ("fine", "6.5"), ("bad", "ten"), ("dull", "2")]
    path = write_csv(tmp_path / "r.csv", ["text", "rating"], rows)
    spec = FinetuneSpec(data=str(path), task="regression", label_column="rating", eval_size=1)
    with pytest.raises(DataError, match=r"regression target must be a number.*'ten'"):
        load_training_data(spec)


def test_a_regression_metric_must_fit_the_task(env) -> None:
    result = invoke_cli(
        env, "finetune", "--data", "x.csv", "--task", "regression", "--metric", "macro_f1"
    )
    assert result.exit_code == 2
    assert "metric macro_f1 does not measure regression; use one of mae, spearman, loss" in (
        result.stderr
    )
