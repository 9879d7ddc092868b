"""A group's runs best first, by the metric that picks each run's best checkpoint: higher
macro-F1 for classifiers, lower MAE for regression; runs that did not succeed last."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from tuneq.schemas.specs import FinetuneSpec
from tuneq.schemas.tables import Job
from tuneq.worker import store
from tuneq.worker.store.db import get_engine
from tuneq.worker.views.sweep import compare_rows


def group_of(env: dict[str, str], task: str, outcomes: list[dict[str, Any] | None]) -> str:
    """A group with one job per outcome: its metrics (succeeded), or None (failed)."""
    engine = get_engine(env["TUNEQ_DATABASE_URL"])
    specs = [FinetuneSpec(data="/d.csv", model="minilm", queue="cpu", task=task,
                          learning_rate=(i + 1) * 1e-5) for i in range(len(outcomes))]  # fmt: skip
    group = store.new_group(group_id=f"{task}-group", size=len(specs), notify=None)
    jobs = store.create_jobs(engine, specs=specs, group=group)
    with engine.begin() as conn:
        for job, metrics in zip(jobs, outcomes, strict=True):
            status = "succeeded" if metrics is not None else "failed"
            conn.execute(update(Job).where(Job.id == job.id).values(status=status, metrics=metrics))
    return group.id


def test_a_regression_group_ranks_by_mae_lowest_first(env: dict[str, str]) -> None:
    group = group_of(env, "regression", [
        {"mae": 1.7, "rmse": 2.3, "spearman": 0.72, "eval_loss": 0.5},
        None,
        {"mae": 1.4, "rmse": 2.1, "spearman": 0.78, "eval_loss": 0.4},
        {"mae": 1.6, "rmse": 2.2, "spearman": 0.75, "eval_loss": 0.45},
    ])  # fmt: skip
    rows = compare_rows(get_engine(env["TUNEQ_DATABASE_URL"]), group)
    assert [r["mae"] for r in rows] == [1.4, 1.6, 1.7, None]
    assert [r["status"] for r in rows][-1] == "failed"
    assert {"mae", "rmse", "spearman", "eval_loss"} <= set(rows[0])
    assert "accuracy" not in rows[0]


def test_a_classification_group_ranks_by_macro_f1_not_accuracy(env: dict[str, str]) -> None:
    group = group_of(env, "classification", [
        {"accuracy": 0.90, "macro_f1": 0.60, "eval_loss": 0.3},  # the majority class, mostly
        {"accuracy": 0.85, "macro_f1": 0.84, "eval_loss": 0.35},
    ])  # fmt: skip
    rows = compare_rows(get_engine(env["TUNEQ_DATABASE_URL"]), group)
    assert [r["macro_f1"] for r in rows] == [0.84, 0.60]
