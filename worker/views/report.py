"""A job's or a group's report as one self-contained HTML file: metrics, plots, data.

Everything the page shows is inside it (styles inline, plots as data: URIs), so it can be
mailed or archived and still open offline.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.errors import JobNotFound
from tuneq.schemas.tables import Job
from tuneq.worker import store
from tuneq.worker.io.artifacts import exists, join, open_artifact
from tuneq.worker.ml.plots import CONFUSION_PNG, LOSS_PNG
from tuneq.worker.views.sweep import compare_rows, spec_as_run

HYPER_PARAMETERS = (
    "model",
    "data",
    "eval_data",
    "train_size",
    "eval_size",
    "max_length",
    "epochs",
    "batch_size",
    "learning_rate",
    "warmup",
    "weight_decay",
    "attention_dropout",
    "precision",
    "seed",
    "task",
    "metric",
    "patience",
)
HEADLINE_METRICS = (
    "accuracy",
    "macro_f1",
    "mae",
    "rmse",
    "spearman",
    "constant_mae",
    "eval_loss",
    "train_loss",
    "train_steps",
    "train_samples_per_second",
    "rows",
    "empty_rows",
    "rows_per_second",
)
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid
#d0d7de; padding-bottom: 0.2em; } h3 { margin: 1.2em 0 0.4em; font-size: 1.05em; }
.muted { color: #656d76; } .failed { color: #cf222e; } .succeeded { color: #1a7f37; }
table { border-collapse: collapse; margin: 0.4em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #dafbe1; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.plots img { max-width: 100%; border: 1px solid #d0d7de; margin: 0.3em 1em 0.3em 0; }
.bar { display: inline-block; height: 0.8em; background: #54aeff; vertical-align: middle; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; }
"""


def build_report(engine: Engine, target: str) -> str:
    """The HTML report of group ``target`` (every job in it, best first) or of job ``target``."""
    jobs = store.list_jobs(engine, group_id=target, limit=10_000)
    if jobs:
        rows = compare_rows(engine, target)
        title, summary = f"Group {target}", group_summary(rows)
        order = {row["job"]: i for i, row in enumerate(rows)}
        jobs.sort(key=lambda job: order[job.id])
    else:
        try:
            jobs = [store.get_job(engine, target)]
        except JobNotFound:
            raise JobNotFound(
                f"no job or group {target!r}; `tuneq jobs` lists jobs, `tuneq jobs --group G` "
                "a group's"
            ) from None
        title, summary = f"Job {jobs[0].id}", ""
    sections = "\n".join(job_section(engine, job) for job in jobs)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>tuneq: {esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='muted'>tuneq report, generated {generated}; "
        f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}.</p>{summary}{sections}</body></html>\n"
    )


def group_summary(rows: list[dict[str, Any]]) -> str:
    """The comparison table (``compare_rows``): the fields that vary, the metrics, best first."""
    headers = list(rows[0])
    body = []
    for i, row in enumerate(rows):
        best = " class='best'" if i == 0 and row["status"] == "succeeded" else ""
        cells = "".join(cell(row[h], link=h == "job") for h in headers)
        body.append(f"<tr{best}>{cells}</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<h2>Runs, best first</h2><table><tr>{head}</tr>{''.join(body)}</table>"


def job_section(engine: Engine, job: Job) -> str:
    """One job: its settings, metrics, per-class scores, data and plots."""
    metrics = job.metrics or {}
    model = store.job_model(engine, job)
    heading = f"<h2 id='{esc(job.id)}'>{esc(job.kind)} job {esc(job.id)}</h2>"
    status = f"<p>Status: <b class='{esc(job.status)}'>{esc(job.status)}</b>"
    if model is not None:
        status += (
            f"; model <b>{esc(model.name)}:{model.version}</b> at <code>{esc(model.path)}</code>"
        )
    if job.output_path:
        status += f"; output <code>{esc(job.output_path)}</code>"
    status += "</p>"
    if job.error:
        status += f"<pre class='failed'>{esc(job.error)}</pre>"
    spec = spec_as_run(job)
    settings = key_values(
        "Settings", [(k, spec.get(k)) for k in HYPER_PARAMETERS if spec.get(k) is not None]
    )
    headline = key_values("Metrics", [(k, metrics[k]) for k in HEADLINE_METRICS if k in metrics])
    choice = key_values("Model choice", list((metrics.get("training") or {}).items()))
    calibration = key_values("Calibration", list((metrics.get("calibration") or {}).items()))
    phases = key_values("Seconds per phase", list((metrics.get("phases") or {}).items()))
    blocks = [settings, headline, choice, calibration, phases]
    if metrics.get("per_class"):
        blocks.append(per_class_table(metrics["per_class"]))
    if metrics.get("data"):
        blocks.append(data_summary(metrics["data"]))
    plots = plot_images(model.path if model else None, metrics.get("plots") or [])
    issues = label_issues_table(metrics.get("label_issues"))
    grid = f"<div class='grid'>{''.join(b for b in blocks if b)}</div>"
    return heading + status + grid + plots + issues


def key_values(title: str, items: list[tuple[str, Any]]) -> str:
    if not items:
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th>{cell(v)}</tr>" for k, v in items)
    return f"<div><h3>{esc(title)}</h3><table>{rows}</table></div>"


def per_class_table(per_class: dict[str, dict[str, Any]]) -> str:
    columns = ("precision", "recall", "f1", "support")
    head = "<tr><th>label</th>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    rows = "".join(
        f"<tr><th>{esc(label)}</th>{''.join(cell(scores.get(c)) for c in columns)}</tr>"
        for label, scores in per_class.items()
    )
    return f"<div><h3>Per class (eval)</h3><table>{head}{rows}</table></div>"


def label_issues_table(issues: dict[str, Any] | None) -> str:
    """The training rows most likely mislabelled, as ranked by confident learning."""
    if not issues:
        return ""
    columns = ("rank", "given_label", "likely_label", "given_label_probability", "text")
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(cell(row.get(c)) for c in columns) + "</tr>" for row in issues["top"]
    )
    summary = (
        f"{issues['found']} of {issues['rows_checked']} training rows look mislabelled "
        f"({issues['folds']} folds, out-of-fold accuracy {issues['out_of_fold_accuracy']}); "
        f"the first {len(issues['top'])} below, all in {esc(issues['file'])} beside the model."
    )
    return (
        f"<div><h3>Likely label errors</h3><p>{summary}</p>"
        f"<table><tr>{head}</tr>{rows}</table></div>"
    )


def data_summary(data: dict[str, Any]) -> str:
    """Row counts and the label distribution of both splits, with bars to compare shares."""
    counts = key_values(
        "Data",
        [(k, data[k]) for k in ("train_rows", "eval_rows", "dropped_rows") if k in data],
    )
    train = data.get("train_label_counts") or {}
    evaluation = data.get("eval_label_counts") or {}
    labels = list(dict.fromkeys([*train, *evaluation]))
    if not labels:
        return counts
    train_total = sum(train.values()) or 1
    eval_total = sum(evaluation.values()) or 1
    rows = "".join(
        f"<tr><th>{esc(label)}</th>{share(train.get(label, 0), train_total)}"
        f"{share(evaluation.get(label, 0), eval_total)}</tr>"
        for label in labels
    )
    distribution = (
        "<div><h3>Label distribution</h3><table><tr><th>label</th><th>train</th><th>eval</th>"
        f"</tr>{rows}</table></div>"
    )
    return counts + distribution


def share(count: int, total: int) -> str:
    fraction = count / total
    bar = f"<span class='bar' style='width:{round(fraction * 80)}px'></span>"
    return f"<td class='num'>{count} ({fraction:.0%}) {bar}</td>"


def plot_images(model_path: str | None, names: list[str]) -> str:
    """The job's plots, read from its model folder and embedded."""
    if not model_path or not names:
        return ""
    captions = {LOSS_PNG: "Training and evaluation loss", CONFUSION_PNG: "Confusion matrix"}
    images = []
    for name in names:
        data = read_plot(model_path, name)
        if data is None:
            images.append(f"<p class='muted'>{esc(name)} is missing from {esc(model_path)}</p>")
            continue
        encoded = base64.b64encode(data).decode("ascii")
        alt = captions.get(name, name)
        images.append(f"<img src='data:image/png;base64,{encoded}' alt='{esc(alt)}'>")
    return f"<div class='plots'><h3>Plots</h3>{''.join(images)}</div>"


def read_plot(model_path: str, name: str) -> bytes | None:
    """A plot's bytes from a model folder or a model in the artifact store."""
    location = join(model_path, name)
    if not exists(location):
        return None
    with open_artifact(location) as handle:
        return handle.read()


def cell(value: Any, link: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{'' if value is None else esc(value)}</td>"
    if isinstance(value, (int, float)):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"<td class='num'>{text}</td>"
    if link:
        return f"<td><a href='#{esc(value)}'>{esc(value)}</a></td>"
    return f"<td>{esc(value)}</td>"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)
