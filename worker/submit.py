"""Submitting a job: the row first (the truth), then its id to the broker."""

from __future__ import annotations

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings, redact_url
from tuneq.schemas.specs import JobSpec
from tuneq.schemas.tables import Job
from tuneq.worker import store
from tuneq.worker.app import create_app, send_job
from tuneq.worker.db import get_engine


class BrokerUnavailable(TuneqError):
    """The broker did not take the job's message."""


def submit_job(settings: Settings, spec: JobSpec) -> Job:
    """Record ``spec`` as a queued job and publish its id to the spec's queue."""
    engine = get_engine(settings.database_url)
    job = store.create_job(engine, spec=spec)
    app = create_app(settings)
    try:
        send_job(app, job.id, spec.queue)
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
        return retry_job(settings, job_id, lambda job, queue: send_job(app, job, queue))
    finally:
        app.close()
