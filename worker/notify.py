"""Telling someone a job ended: a JSON summary POSTed to the URL its spec names.

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
from tuneq.schemas.tables import Job
from tuneq.worker import store

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
SUMMARY_METRICS = ("accuracy", "macro_f1", "eval_loss", "rows", "empty_rows", "rows_per_second")


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


def notify_end(engine: Engine, job_id: str) -> None:
    """POST job ``job_id``'s summary to its spec's ``notify`` URL, if any; record the outcome.
    Never raises: the job has ended whatever happens here."""
    try:
        job = store.get_job(engine, job_id)
        url = parse_spec(job.spec).notify
        if not url:
            return
        try:
            post_json(url, summary(engine, job))
            kind, message = "notified", f"posted the summary to {url}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            kind, message = "warning", f"could not notify {url}: {exc}"
        store.add_event(engine, job_id=job.id, attempt=job.attempt, kind=kind, message=message)
    except Exception:
        log.exception("notifying the end of job %s failed", job_id)
