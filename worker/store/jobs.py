"""Jobs and their events: creation, claims, progress, leases, and the reaper's queries. Every
change to a running job is a compare-and-set on ``(id, status, attempt)``, so a stale or
duplicate worker changes nothing; callers learn whether their write landed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, or_, select, update
from sqlalchemy.orm import Session

from tuneq.schemas.errors import JobNotFound
from tuneq.schemas.specs import JobSpec
from tuneq.schemas.statuses import ACTIVE, WAITING, JobStatus, ShardStatus, values
from tuneq.schemas.tables import Job, JobEvent, JobGroup, Shard, utcnow


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def add_event_in(
    conn: Connection, *, job_id: str, at: datetime, attempt: int, kind: str, message: str
) -> None:
    """Record a job event inside the caller's transaction."""
    conn.execute(
        JobEvent.__table__.insert().values(
            job_id=job_id, at=at, attempt=attempt, kind=kind, message=message
        )
    )


def create_jobs(
    engine: Engine,
    *,
    specs: list[JobSpec],
    group: JobGroup | None = None,
    group_id: str | None = None,
) -> list[Job]:
    """Insert a queued job for each spec (each routed to its queue already), and ``group``
    if given (their sweep), in one transaction: all of them, or none."""
    if any(spec.queue is None for spec in specs):
        raise ValueError("route the job to a queue before creating it (tuneq.worker.jobs.submit)")
    now = utcnow()
    jobs = [
        Job(
            id=new_job_id(),
            kind=spec.kind,
            status=JobStatus.queued.value,
            queue=spec.queue,
            spec=spec.model_dump(mode="json"),
            attempt=0,
            created_at=now,
            published_at=now,
            group_id=group.id if group else group_id,
        )
        for spec in specs
    ]
    with Session(engine, expire_on_commit=False) as session, session.begin():
        if group is not None:
            session.add(group)
            session.flush()
        for job in jobs:
            session.add(job)
            session.add(JobEvent(job_id=job.id, attempt=0, kind="queued", message="job queued"))
    return jobs


def create_job(engine: Engine, *, spec: JobSpec, group_id: str | None = None) -> Job:
    """Insert one queued job for ``spec``, whose queue is chosen already."""
    return create_jobs(engine, specs=[spec], group_id=group_id)[0]


def priority_of(job: Job) -> str:
    """The job's place in its queue: high, normal or low (jobs from before priorities: normal)."""
    return str(job.spec.get("priority") or "normal")


def get_job(engine: Engine, job_id: str) -> Job:
    """The job with id ``job_id`` (or a unique prefix of one of at least 4 characters)."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None and len(job_id) >= 4:
            matches = session.scalars(
                select(Job).where(Job.id.startswith(job_id, autoescape=True)).limit(2)
            ).all()
            job = matches[0] if len(matches) == 1 else None
        if job is None:
            raise JobNotFound(f"no job {job_id!r}; `tuneq jobs` lists them")
        return job


def list_jobs(
    engine: Engine,
    *,
    limit: int = 50,
    status: str | None = None,
    group_id: str | None = None,
    kind: str | None = None,
    model: str | None = None,
) -> list[Job]:
    """The newest jobs first; ``model`` matches the spec's model (a base model or a
    registered ``name:version``) by its start."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if group_id:
        query = query.where(Job.group_id == group_id)
    if kind:
        query = query.where(Job.kind == kind)
    if model:
        query = query.where(Job.spec["model"].as_string().startswith(model, autoescape=True))
    with Session(engine) as session:
        return list(session.scalars(query))


def list_events(engine: Engine, job_id: str) -> list[JobEvent]:
    with Session(engine) as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(session.scalars(query))


def jobs_with_ids(engine: Engine, job_ids: list[str]) -> list[Job]:
    """The jobs among ``job_ids`` that exist."""
    if not job_ids:
        return []
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.id.in_(job_ids))))


def claim_job(engine: Engine, *, job_id: str, worker: str) -> tuple[int, str] | None:
    """Move a waiting job to running under a new attempt: the attempt and the status it was
    claimed from; ``None`` if someone else has it."""
    now = utcnow()
    with engine.begin() as conn:
        previous = conn.execute(select(Job.status).where(Job.id == job_id)).scalar()
        if previous not in values(WAITING):
            return None
        result = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == previous)
            .values(
                status=JobStatus.running.value,
                attempt=Job.attempt + 1,
                worker=worker,
                started_at=now,
                heartbeat_at=now,
                error=None,
                traceback=None,
            )
        )
        if result.rowcount != 1:
            return None
        attempt = conn.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
        add_event_in(
            conn,
            job_id=job_id,
            at=now,
            attempt=attempt,
            kind="running",
            message=f"started on {worker}",
        )
        return int(attempt), str(previous)


def _running(job_id: str, attempt: int) -> Any:
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempt == attempt)


def record_progress(engine: Engine, *, job_id: str, attempt: int, progress: dict[str, Any]) -> bool:
    """Store the running job's progress and heartbeat; ``False`` if the lease was lost."""
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(*_running(job_id, attempt))
            .values(progress=progress, heartbeat_at=utcnow())
        )
        return result.rowcount == 1


def fail_unsent(engine: Engine, *, job_id: str, error: str) -> bool:
    """Fail a queued job whose message never reached the broker; ``False`` if it was not
    queued any more."""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
            .values(status=JobStatus.failed.value, finished_at=now, error=error)
        )
        if result.rowcount != 1:
            return False
        add_event_in(conn, job_id=job_id, at=now, attempt=0, kind="failed", message=error)
        return True


def add_event(engine: Engine, *, job_id: str, attempt: int, kind: str, message: str) -> None:
    with Session(engine) as session, session.begin():
        session.add(JobEvent(job_id=job_id, attempt=attempt, kind=kind, message=message))


def mark_failed(
    engine: Engine, *, job_id: str, attempt: int, error: str, traceback: str | None = None
) -> bool:
    """End a running job as failed with ``error``; ``False`` if the lease was lost."""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(*_running(job_id, attempt))
            .values(
                status=JobStatus.failed.value, finished_at=now, error=error, traceback=traceback
            )
        )
        if result.rowcount != 1:
            return False
        add_event_in(conn, job_id=job_id, at=now, attempt=attempt, kind="failed", message=error)
        return True


def mark_scored(
    engine: Engine, *, job_id: str, attempt: int, output_path: str, metrics: dict[str, Any]
) -> bool:
    """End a scoring job as succeeded, pointing at its output; ``False`` if the lease was lost."""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(*_running(job_id, attempt))
            .values(
                status=JobStatus.succeeded.value,
                finished_at=now,
                output_path=output_path,
                metrics=metrics,
            )
        )
        if result.rowcount != 1:
            return False
        add_event_in(
            conn,
            job_id=job_id,
            at=now,
            attempt=attempt,
            kind="succeeded",
            message=f"wrote {output_path}",
        )
        return True


def renew_job_lease(engine: Engine, *, job_id: str, attempt: int) -> bool:
    """Heartbeat of a running job; ``False`` once it is cancelled or requeued."""
    with engine.begin() as conn:
        result = conn.execute(
            update(Job).where(*_running(job_id, attempt)).values(heartbeat_at=utcnow())
        )
        return result.rowcount == 1


def cancel_job(engine: Engine, *, job_id: str) -> bool:
    """Cancel a queued or running job; ``False`` if it had already ended."""
    now = utcnow()
    with engine.begin() as conn:
        attempt = conn.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
        result = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(values(ACTIVE)))
            .values(status=JobStatus.cancelled.value, finished_at=now, error="cancelled")
        )
        if result.rowcount != 1:
            return False
        add_event_in(
            conn, job_id=job_id, at=now, attempt=attempt, kind="cancelled", message="cancelled"
        )
        return True


def requeue_job(
    engine: Engine,
    *,
    job_id: str,
    from_statuses: list[str],
    to_status: JobStatus,
    reason: str,
    attempt: int | None = None,
    event: str | None = None,
) -> bool:
    """Put a job back in the queue (a retry, a job whose worker was lost or handed it back)
    and note why, in an event of kind ``event`` (default: the new status)."""
    now = utcnow()
    conditions = [Job.id == job_id, Job.status.in_(from_statuses)]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    with engine.begin() as conn:
        result = conn.execute(
            update(Job)
            .where(*conditions)
            .values(
                status=to_status.value,
                finished_at=None,
                error=None,
                traceback=None,
                progress=None,
                model_id=None,
                output_path=None,
                published_at=now,
            )
        )
        if result.rowcount != 1:
            return False
        conn.execute(delete(Shard).where(Shard.job_id == job_id))
        current = conn.execute(select(Job.attempt).where(Job.id == job_id)).scalar_one()
        add_event_in(
            conn,
            job_id=job_id,
            at=now,
            attempt=current,
            kind=event or to_status.value,
            message=reason,
        )
        return True


def mark_published(
    engine: Engine, *, job_id: str, index: int | None = None, before: datetime | None = None
) -> bool:
    """Record that a job's (or shard's) message was sent now. With ``before``, only if the
    last one went out before then: of several reapers, one wins and publishes."""
    if index is None:
        table, conditions = Job, [Job.id == job_id]
        if before is not None:
            conditions.append(func.coalesce(Job.published_at, Job.created_at) < before)
    else:
        table, conditions = Shard, [Shard.job_id == job_id, Shard.index == index]
        if before is not None:
            conditions.append(or_(Shard.published_at.is_(None), Shard.published_at < before))
    with engine.begin() as conn:
        return (
            conn.execute(update(table).where(*conditions).values(published_at=utcnow())).rowcount
            == 1
        )


def stale_jobs(engine: Engine, *, before: datetime) -> list[Job]:
    """Running jobs whose lease expired, leaving out scoring jobs with shards still to score
    (those shards hold the leases; the job's own lease covers staging and assembly)."""
    unfinished = select(Shard.job_id).where(
        Shard.job_id == Job.id, Shard.status != ShardStatus.done.value
    )
    query = select(Job).where(
        Job.status == JobStatus.running.value, Job.heartbeat_at < before, ~unfinished.exists()
    )
    with Session(engine) as session:
        return list(session.scalars(query))


def unclaimed_jobs(engine: Engine, *, before: datetime) -> list[Job]:
    """Queued jobs whose last message went out before ``before``: it may have been lost."""
    query = select(Job).where(
        Job.status.in_(values(WAITING)), func.coalesce(Job.published_at, Job.created_at) < before
    )
    with Session(engine) as session:
        return list(session.scalars(query))
