"""Submitting a job: the row first (the truth), then its id to the broker."""

from __future__ import annotations

from sqlalchemy import Engine

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings, redact_url
from tuneq.schemas.specs import JobSpec, ScoreSpec
from tuneq.schemas.tables import Job
from tuneq.worker import store
from tuneq.worker.app import create_app, send_job
from tuneq.worker.db import get_engine
from tuneq.worker.registry import listening

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"


class BrokerUnavailable(TuneqError):
    """The broker did not take the job's message."""


def route(settings: Settings, engine: Engine, spec: JobSpec) -> str:
    """The queue a job goes to: its own ``queue`` if set; else ``gpu`` or ``cpu`` as its
    ``device`` says; for ``device: auto``, ``gpu`` when a live worker listens on that queue
    (int8 scoring excepted: it runs on CPUs only), else ``cpu``."""
    if spec.queue:
        return spec.queue
    if spec.device != "auto":
        return spec.device
    if isinstance(spec, ScoreSpec) and spec.precision == "int8":
        return CPU_QUEUE
    gpu = listening(engine, queue=GPU_QUEUE, interval_s=settings.reap_interval_s)
    return GPU_QUEUE if gpu else CPU_QUEUE


def submit_job(settings: Settings, spec: JobSpec, *, group_id: str | None = None) -> Job:
    """Record ``spec`` as a queued job, with its queue chosen, and publish its id there."""
    engine = get_engine(settings.database_url)
    spec = spec.model_copy(update={"queue": route(settings, engine, spec)})
    job = store.create_job(engine, spec=spec, group_id=group_id)
    app = create_app(settings)
    try:
        send_job(app, job.id, job.queue, spec.priority)
    except Exception as exc:  # kombu raises OperationalError, ConnectionError, …
        store.fail_unsent(engine, job_id=job.id, error=f"broker unreachable: {exc}")
        raise BrokerUnavailable(
            f"cannot send job {job.id} to the broker at {redact_url(settings.broker_url)} ({exc}); "
            "check that it runs and that TUNEQ_BROKER_URL is right"
        ) from None
    finally:
        app.close()
    return job


def retry(settings: Settings, job_id: str) -> str:
    """Queue a failed or cancelled job again and publish it."""
    from tuneq.worker.runner import retry_job

    app = create_app(settings)
    try:
        return retry_job(
            settings, job_id, lambda job, queue, priority: send_job(app, job, queue, priority)
        )
    finally:
        app.close()
