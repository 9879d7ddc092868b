"""Plain-text tables and job/model descriptions for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneq.schemas.statuses import ACTIVE, JobStatus

if TYPE_CHECKING:
    from tuneq.schemas.tables import Job, JobEvent, Model


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == ""
    return True


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end.replace(tzinfo=None) - start.replace(tzinfo=None)).total_seconds()


def metric(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def job_row(job: Job) -> list[Any]:
    duration = seconds_between(job.started_at, job.finished_at)
    accuracy = (job.metrics or {}).get("accuracy")
    return [
        job.id,
        job.kind,
        job.status,
        job.spec.get("name") or "",
        job.spec.get("model", ""),
        when(job.created_at),
        f"{duration:.1f}" if duration is not None else "",
        metric(accuracy) if accuracy is not None else "",
    ]


JOB_HEADERS = ["id", "kind", "status", "name", "model", "created", "seconds", "accuracy"]


def describe_job(
    job: Job, model: Model | None, events: list[JobEvent], eta: str | None = None
) -> str:
    """Everything ``tuneq show`` prints about a job; ``eta`` says when a waiting or running
    job should start and end."""
    lines = [
        f"job       {job.id}",
        f"kind      {job.kind}",
        f"status    {job.status}",
        f"queue     {job.queue}",
        f"attempt   {job.attempt}" + (f" on {job.worker}" if job.worker else ""),
        f"created   {when(job.created_at)}",
        f"started   {when(job.started_at)}",
        f"finished  {when(job.finished_at)}",
    ]
    duration = seconds_between(job.started_at, job.finished_at)
    if duration is not None:
        lines.append(f"duration  {duration:.1f}s")
    if job.progress and JobStatus(job.status) in ACTIVE:
        from tuneq.cli.follow import progress_line

        lines.append(f"progress  {progress_line(job)}")
    if eta:
        lines.append(f"eta       {eta}")
    lines.append("spec")
    lines += [f"  {key}: {value}" for key, value in job.spec.items() if value is not None]
    if job.metrics and job.kind == "score":
        lines += describe_scoring(job.metrics)
    elif job.metrics:
        lines += describe_metrics(job.metrics)
    if model is not None:
        lines.append(f"model     {model.name}:{model.version}  {model.path}")
    if job.output_path:
        lines.append(f"output    {job.output_path}")
    if job.error:
        lines.append(f"error     {job.error}")
    if events:
        lines.append("events")
        lines += [f"  {when(e.at)}  {e.kind:<9} {e.message}" for e in events]
    return "\n".join(lines)


def describe_metrics(metrics: dict[str, Any]) -> list[str]:
    if "mae" in metrics:
        return describe_regression(metrics)
    if "micro_f1" in metrics:
        headline = [
            f"  micro-F1   {metric(metrics.get('micro_f1'))}  (one label set for every row: "
            f"{metric(metrics.get('constant_micro_f1'))})",
            f"  macro-F1   {metric(metrics.get('macro_f1'))}",
            f"  all right  {metric(metrics.get('subset_accuracy'))} of rows",
        ]
    else:
        headline = [
            f"  accuracy   {metric(metrics.get('accuracy'))}",
            f"  macro-F1   {metric(metrics.get('macro_f1'))}",
        ]
    lines = [
        "metrics",
        *headline,
        f"  eval loss  {metric(metrics.get('eval_loss'))}",
        f"  train loss {metric(metrics.get('train_loss'))}"
        f"  ({metrics.get('train_steps', '-')} steps)",
        *describe_model_choice(metrics),
    ]
    per_class = metrics.get("per_class") or {}
    if per_class:
        rows = [
            [name, metric(v["precision"]), metric(v["recall"]), metric(v["f1"]), v["support"]]
            + ([metric(v["threshold"], 2)] if "threshold" in v else [])
            for name, v in per_class.items()
        ]
        columns = ["label", "precision", "recall", "f1", "support"]
        if rows and len(rows[0]) > len(columns):
            columns.append("threshold")
        body = table(columns, rows)
        lines += ["  " + line for line in body.splitlines()]
    matrix = metrics.get("confusion_matrix")
    if matrix and per_class:
        names = list(per_class)
        rows = [[f"true {names[i]}", *row] for i, row in enumerate(matrix)]
        body = table(["confusion", *[f"pred {n}" for n in names]], rows)
        lines += ["  " + line for line in body.splitlines()]
    curve = metrics.get("loss_curve") or []
    if curve:
        shown = ", ".join(f"{p['step']}:{p['loss']:.3f}" for p in curve[:: max(1, len(curve) // 8)])
        lines.append(f"  loss curve (step:loss) {shown}")
    phases = metrics.get("phases") or {}
    if phases:
        lines.append("  phases     " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    return lines


def describe_regression(metrics: dict[str, Any]) -> list[str]:
    return [
        "metrics",
        f"  MAE        {metric(metrics.get('mae'))}  (predicting the mean: "
        f"{metric(metrics.get('constant_mae'))})",
        f"  RMSE       {metric(metrics.get('rmse'))}",
        f"  Spearman   {metric(metrics.get('spearman'))}",
        f"  eval loss  {metric(metrics.get('eval_loss'))}",
        f"  train loss {metric(metrics.get('train_loss'))}"
        f"  ({metrics.get('train_steps', '-')} steps)",
        *describe_model_choice(metrics),
    ]


def describe_model_choice(metrics: dict[str, Any]) -> list[str]:
    """Which evaluation the registered model is, why training ended, and its calibration."""
    lines = []
    training = metrics.get("training")
    if training:
        lines.append(
            f"  kept       step {training['best_step']} of {training['final_step']}, best "
            f"{training['metric']} {metric(training['best_metric'])}; {training['stop_reason']}"
        )
    issues = metrics.get("label_issues")
    if issues:
        lines.append(
            f"  label errors {issues['found']} of {issues['rows_checked']} training rows look "
            f"mislabelled ({issues['file']} beside the model)"
        )
    calibration = metrics.get("calibration")
    if calibration:
        lines.append(
            f"  calibrated temperature {calibration['temperature']:.3g}, ECE "
            f"{metric(calibration['ece_before'])} -> {metric(calibration['ece_after'])}"
        )
    return lines


def describe_scoring(metrics: dict[str, Any]) -> list[str]:
    return [
        "metrics",
        f"  rows       {metrics.get('rows')} ({metrics.get('empty_rows')} with empty text)",
        f"  shards     {metrics.get('shards')} on {metrics.get('workers')} worker(s)",
        f"  speed      {metrics.get('rows_per_second')} rows/s over {metrics.get('seconds')}s "
        f"({metrics.get('precision')})",
    ]


MODEL_HEADERS = ["model", "base", "labels", "accuracy", "macro-F1", "created", "path"]


def model_row(model: Model) -> list[Any]:
    return [
        f"{model.name}:{model.version}",
        model.base_model,
        ",".join(model.labels),
        metric(model.metrics.get("accuracy")),
        metric(model.metrics.get("macro_f1")),
        when(model.created_at),
        model.path,
    ]
