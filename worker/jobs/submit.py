"""Submitting a job: the row first (the truth), then its id to the broker."""

from __future__ import annotations

from sqlalchemy import Engine

from tuneq.schemas.errors import TuneqError
from tuneq.schemas.settings import Settings, redact_url
from tuneq.schemas.specs import JobSpec, ScoreSpec
from tuneq.schemas.tables import Job, JobGroup
from tuneq.worker import store
from tuneq.worker.jobs import lifecycle
from tuneq.worker.jobs.app import create_app, send_job
from tuneq.worker.store.db import get_engine
from tuneq.worker.store.workers import listening

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


def submit_job(settings: Settings, spec: JobSpec) -> Job:
    """Record ``spec`` as a queued job, with its queue chosen, and publish its id there."""
    return submit_jobs(settings, [spec])[0]


def submit_jobs(
    settings: Settings, specs: list[JobSpec], *, group: JobGroup | None = None
) -> list[Job]:
    """Record every spec as a queued job (and ``group``, their sweep) in one transaction,
    then publish their ids. If the broker fails half-way, the jobs not yet published fail
    with the reason (events and notifications included), so a group still ends whole."""
    engine = get_engine(settings.database_url)
    routed = [spec.model_copy(update={"queue": route(settings, engine, spec)}) for spec in specs]
    jobs = store.create_jobs(engine, specs=routed, group=group)
    app = create_app(settings)
    try:
        for sent, (job, spec) in enumerate(zip(jobs, routed, strict=True)):
            try:
                send_job(app, job.id, job.queue, spec.priority)
            except Exception as exc:  # kombu raises OperationalError, ConnectionError, …
                error = f"broker unreachable: {exc}"
                lifecycle.fail_unsent(engine, [j.id for j in jobs[sent:]], error)
                raise BrokerUnavailable(
                    f"cannot send job {job.id} to the broker at "
                    f"{redact_url(settings.broker_url)} ({exc}); check that it runs and that "
                    f"TUNEQ_BROKER_URL is right"
                    + (f" ({len(jobs) - sent} of {len(jobs)} jobs failed unsent)" if sent else "")
                ) from None
    finally:
        app.close()
    return jobs


def retry(settings: Settings, job_id: str, *, resume: bool = False) -> Job:
    """Queue a failed or cancelled job again (from the start, or to ``resume``) and publish
    it."""
    app = create_app(settings)
    try:
        return lifecycle.retry(
            get_engine(settings.database_url),
            job_id,
            resume=resume,
            publish=lambda job, queue, priority: send_job(app, job, queue, priority),
        )
    finally:
        app.close()
