"""The JSON documents that describe jobs, models, queue estimates and workers: what every
``--json`` prints and what the dashboard's API serves, so scripts and pages read one thing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.tables import Job, JobEvent, Model
from tuneq.worker import store
from tuneq.worker.store.workers import LiveWorker
from tuneq.worker.views.eta import Estimate, job_estimate


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "queue": job.queue,
        "attempt": job.attempt,
        "worker": job.worker,
        "group": job.group_id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "spec": job.spec,
        "progress": job.progress,
        "metrics": job.metrics,
        "error": job.error,
        "model_id": job.model_id,
        "output_path": job.output_path,
    }


def job_detail(engine: Engine, job_id: str, *, interval_s: float) -> dict[str, Any]:
    """Everything ``tuneq show --json`` prints: the job, its model, where it stands in the
    queue while it waits or runs, its events, and the traceback of an internal error."""
    job = store.get_job(engine, job_id)
    model = store.job_model(engine, job)
    estimate = job_estimate(engine, job, interval_s=interval_s)
    document = job_json(job)
    document["model"] = model_json(model) if model else None
    document["estimate"] = estimate_json(estimate) if estimate else None
    document["events"] = [event_json(e) for e in store.list_events(engine, job.id)]
    document["traceback"] = job.traceback
    return document


def event_json(event: JobEvent) -> dict[str, Any]:
    return {"at": iso(event.at), "attempt": event.attempt, "kind": event.kind,
            "message": event.message}  # fmt: skip


def model_json(model: Model, tags: list[str] | None = None) -> dict[str, Any]:
    document = {
        "name": model.name,
        "version": model.version,
        "base_model": model.base_model,
        "labels": model.labels,
        "metrics": model.metrics,
        "data_fingerprint": model.data_fingerprint,
        "path": model.path,
        "job_id": model.job_id,
        "created_at": iso(model.created_at),
    }
    if tags is not None:
        document["tags"] = tags
    return document


def estimate_json(estimate: Estimate) -> dict[str, Any]:
    return {
        "job": estimate.job_id,
        "queue": estimate.queue,
        "priority": estimate.priority,
        "position": estimate.position,
        "start_in_s": rounded(estimate.start_in_s),
        "end_in_s": rounded(estimate.end_in_s),
        "basis": estimate.basis,
    }


def worker_json(live: LiveWorker) -> dict[str, Any]:
    return {
        "name": live.worker.name,
        "hostname": live.worker.hostname,
        "queues": live.worker.queues,
        "device": live.worker.device,
        "concurrency": live.worker.concurrency,
        "threads": live.worker.threads,
        "started_at": iso(live.worker.started_at),
        "heartbeat_at": iso(live.worker.heartbeat_at),
        "running": live.running,
    }


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)
