"""Telling someone a job ended: a JSON summary POSTed to the URL its spec names, and a group's
summary to the group's URL once all of its jobs have ended.

Sent once, by whoever made the final transition (each is a compare-and-set, so only one
process can); a failed notification is recorded on the job and never fails it.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.specs import parse_spec
from tuneq.schemas.statuses import FINISHED, values
from tuneq.schemas.tables import Job, JobGroup
from tuneq.worker import store

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
GROUP_COUNTS = values(FINISHED)
SUMMARY_METRICS = (
    "accuracy",
    "macro_f1",
    "mae",
    "spearman",
    "eval_loss",
    "rows",
    "empty_rows",
    "rows_per_second",
)


def summary(engine: Engine, job: Job) -> dict[str, Any]:
    """What a notification says about ``job``."""
    model = store.job_model(engine, job)
    metrics = job.metrics or {}
    return {
        "job": job.id,
        "kind": job.kind,
        "status": job.status,
        "error": job.error,
        "model": f"{model.name}:{model.version}" if model else None,
        "output": job.output_path,
        "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def post_json(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "tuneq"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) only
        response.read()


def group_summary(engine: Engine, group: JobGroup) -> dict[str, Any]:
    """What a group's notification says: how its jobs ended, and its runs best first."""
    from tuneq.worker.views.sweep import compare_rows

    runs = compare_rows(engine, group.id)
    counts = {status: sum(run["status"] == status for run in runs) for status in GROUP_COUNTS}
    return {
        "group": group.id,
        "jobs": group.size,
        **counts,
        "best": runs[0] if runs and runs[0]["status"] == "succeeded" else None,
        "runs": runs,
        "finished_at": group.notified_at.isoformat() if group.notified_at else None,
    }


def send(engine: Engine, job: Job, url: str, payload: dict[str, Any], what: str) -> None:
    """POST ``payload`` and record on ``job`` whether it arrived."""
    try:
        post_json(url, payload)
        kind, message = "notified", f"posted the {what} to {url}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        kind, message = "warning", f"could not post the {what} to {url}: {exc}"
    store.add_event(engine, job_id=job.id, attempt=job.attempt, kind=kind, message=message)


def notify_end(engine: Engine, job_id: str) -> None:
    """POST job ``job_id``'s summary to its spec's ``notify`` URL, if any; when it was the last
    of its group to end, the group's summary to the group's URL. Never raises: the job has
    ended whatever happens here."""
    try:
        job = store.get_job(engine, job_id)
        url = parse_spec(job.spec).notify
        if url:
            send(engine, job, url, summary(engine, job), "summary")
        group = (
            store.claim_group_notification(engine, group_id=job.group_id) if job.group_id else None
        )
        if group is not None and group.notify:
            send(
                engine,
                job,
                group.notify,
                group_summary(engine, group),
                f"summary of group {group.id}",
            )
    except Exception:
        log.exception("notifying the end of job %s failed", job_id)
