"""Sweeps: one file, many fine-tunes. A base spec, a grid of values and a list of data sets
expand into one job per combination, in one group."""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.errors import ConfigError, JobNotFound
from tuneq.schemas.specs import TASK_METRICS, FinetuneSpec, check_notify_url
from tuneq.schemas.tables import Job
from tuneq.worker import store

SWEEP_KEYS = ("name", "base", "grid", "data", "notify")
METRIC_COLUMNS = {
    "classification": ("accuracy", "macro_f1", "eval_loss"),
    "multi_label": ("micro_f1", "macro_f1", "eval_loss"),
    "regression": ("mae", "rmse", "spearman", "eval_loss"),
}
LOWER_IS_BETTER = ("eval_loss", "mae", "rmse")


@dataclass(frozen=True)
class Sweep:
    group_id: str
    runs: list[dict[str, Any]]  # spec fields, one mapping per job
    notify: str | None = None  # URL for the group's summary once every job has ended


def expand(document: dict[str, Any], default_name: str) -> Sweep:
    """The jobs of a sweep file: every combination of ``grid`` values (and of ``data``, when
    it lists several data sets) on top of ``base``. Raises ``ConfigError`` on a bad file."""
    unknown = sorted(set(document) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep keys {unknown}; a sweep has {', '.join(SWEEP_KEYS)}")
    base = dict(document.get("base") or {})
    grid = dict(document.get("grid") or {})
    data = document.get("data")
    fields = set(FinetuneSpec.model_fields)
    for key in [*base, *grid]:
        if key not in fields:
            raise ConfigError(f"{key!r} is not a fine-tune field (see `tuneq finetune --help`)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list of values")
    if data is not None:
        if isinstance(data, str):
            data = [data]
        grid["data"] = list(data)
    if not grid:
        raise ConfigError("a sweep needs a grid (lists of values) or a list of data sets")
    names = list(grid)
    runs = [
        dict(base, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*grid.values())
    ]
    stem = re.sub(r"[^a-z0-9-]+", "-", str(document.get("name") or default_name).lower()).strip("-")
    notify = document.get("notify")
    if notify is not None:
        try:
            check_notify_url(str(notify))
        except ValueError as exc:
            raise ConfigError(f"notify {exc}") from None
    group_id = f"{stem or 'sweep'}-{uuid.uuid4().hex[:6]}"
    return Sweep(group_id=group_id, runs=runs, notify=str(notify) if notify else None)


def varied_fields(specs: list[dict[str, Any]]) -> list[str]:
    """The spec fields whose values differ between ``specs``, in field order."""
    order = list(FinetuneSpec.model_fields)
    keys = {key for spec in specs for key in spec}
    return [
        key for key in order if key in keys and len({repr(spec.get(key)) for spec in specs}) > 1
    ]


# Fine-tune fields whose default the run resolves (from its data or its model) and records in
# metrics.training.
RESOLVED_AT_RUN = ("learning_rate", "attention_dropout")


def spec_as_run(job: Job) -> dict[str, Any]:
    """``job``'s spec with the learning rate and attention dropout it trained with: a field
    left to its default (None) shows what the run chose (``metrics.training``), "auto" until it
    has run (and for attention dropout, "model's" where the model had no such setting)."""
    spec = dict(job.spec)
    if job.kind != "finetune":
        return spec
    training = (job.metrics or {}).get("training")
    for name in RESOLVED_AT_RUN:
        if spec.get(name) is None:
            chosen = (training or {}).get(name)
            spec[name] = chosen if chosen is not None else "model's" if training else "auto"
    return spec


def compare_rows(engine: Engine, group_id: str) -> list[dict[str, Any]]:
    """The group's jobs, best first (succeeded ones by the metric that picks their best
    checkpoint, then the rest): the fields that vary between them, their metrics, train
    seconds and model."""
    jobs = store.list_jobs(engine, group_id=group_id, limit=10_000)
    if not jobs:
        raise JobNotFound(f"no jobs in group {group_id!r}; `tuneq sweep FILE` starts one")
    specs = [spec_as_run(job) for job in jobs]
    varied = varied_fields(specs)
    metric, columns = ranking(jobs[0].spec)
    rows = []
    for job, spec in zip(jobs, specs, strict=True):
        metrics = job.metrics or {}
        model = store.job_model(engine, job)
        rows.append(
            {
                "job": job.id,
                "status": job.status,
                **{key: spec.get(key) for key in varied},
                **{key: metrics.get(key) for key in columns},
                "train_s": (metrics.get("phases") or {}).get("train"),
                "model": f"{model.name}:{model.version}" if model else None,
            }
        )
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    missing = float("inf")
    rows.sort(
        key=lambda r: (
            r["status"] != "succeeded",
            missing if r.get(metric) is None else sign * r[metric],
            r["job"],
        )
    )
    return rows


def ranking(spec: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The metric a group's runs are ranked by (what picks each run's best checkpoint; the
    evaluation loss for ``loss``) and the metric columns of its task."""
    task = str(spec.get("task") or "classification")
    chosen = str(spec.get("metric") or TASK_METRICS[task][0])
    metric = "eval_loss" if chosen == "loss" else chosen
    return metric, METRIC_COLUMNS[task]
