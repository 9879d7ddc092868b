"""Reading and writing jobs, events and models: one short transaction per function.

Every change to a running job is a compare-and-set on ``(id, status, attempt)``, so a stale or
duplicate worker changes nothing; callers learn whether their write landed from the result.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneq.schemas.errors import JobNotFound, ModelNotFound
from tuneq.schemas.specs import JobSpec
from tuneq.schemas.tables import (
    ACTIVE,
    FINISHED,
    WAITING,
    Job,
    JobEvent,
    JobGroup,
    JobStatus,
    Model,
    ModelTag,
    Shard,
    ShardStatus,
    utcnow,
    values,
)


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
        raise ValueError("route the job to a queue before creating it (tuneq.worker.submit)")
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


def new_group(*, group_id: str, size: int, notify: str | None) -> JobGroup:
    """A group of ``size`` jobs (a sweep), to be recorded with its jobs by ``create_jobs``."""
    return JobGroup(id=group_id, size=size, notify=notify, created_at=utcnow())


def claim_group_notification(engine: Engine, *, group_id: str) -> JobGroup | None:
    """The group, if every one of its jobs has ended and nobody has claimed its notification
    yet; a compare-and-set, so of the processes finishing its last jobs exactly one gets it."""
    ended = (
        select(func.count())
        .select_from(Job)
        .where(Job.group_id == group_id, Job.status.in_(values(FINISHED)))
        .scalar_subquery()
    )
    claim = (
        update(JobGroup)
        .where(JobGroup.id == group_id, JobGroup.notified_at.is_(None), JobGroup.size == ended)
        .values(notified_at=utcnow())
    )
    with engine.begin() as conn:
        if conn.execute(claim).rowcount != 1:
            return None
    with Session(engine) as session:
        return session.get(JobGroup, group_id)


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
    engine: Engine, *, limit: int = 50, status: str | None = None, group_id: str | None = None
) -> list[Job]:
    """The newest jobs first."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if status:
        query = query.where(Job.status == status)
    if group_id:
        query = query.where(Job.group_id == group_id)
    with Session(engine) as session:
        return list(session.scalars(query))


def list_events(engine: Engine, job_id: str) -> list[JobEvent]:
    with Session(engine) as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(session.scalars(query))


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


def register_model(
    engine: Engine,
    *,
    job_id: str,
    attempt: int,
    staged_dir: Path,
    models_dir: Path,
    model: dict[str, Any],
    metrics: dict[str, Any],
    stored_at: str | None = None,
) -> Model | None:
    """Move ``staged_dir`` into place as the next version of ``model['name']``, register it,
    and mark the job succeeded, all in one transaction. A model already uploaded to an
    artifact store is registered at ``stored_at`` instead, and nothing is moved.

    Returns ``None`` (and deletes ``staged_dir``) if the job's lease was lost.
    """
    for _ in range(5):
        try:
            return _register_once(
                engine,
                job_id=job_id,
                attempt=attempt,
                staged_dir=staged_dir,
                models_dir=models_dir,
                model=model,
                metrics=metrics,
                stored_at=stored_at,
            )
        except IntegrityError:
            continue  # another job took the same version at the same moment: take the next
    raise RuntimeError(f"could not allocate a version for model {model['name']!r}")


def _register_once(
    engine: Engine,
    *,
    job_id: str,
    attempt: int,
    staged_dir: Path,
    models_dir: Path,
    model: dict[str, Any],
    metrics: dict[str, Any],
    stored_at: str | None = None,
) -> Model | None:
    final_dir: Path | None = None
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            still_ours = session.execute(
                select(Job.id).where(*_running(job_id, attempt)).with_for_update()
            ).first()
            if still_ours is None:
                shutil.rmtree(staged_dir, ignore_errors=True)
                return None
            latest = session.scalar(
                select(func.max(Model.version)).where(Model.name == model["name"])
            )
            version = (latest or 0) + 1
            if stored_at is None:
                final_dir = models_dir / model["name"] / str(version)
                final_dir.parent.mkdir(parents=True, exist_ok=True)
                staged_dir.rename(final_dir)
            row = Model(
                version=version,
                path=stored_at or str(final_dir),
                job_id=job_id,
                metrics=metrics,
                created_at=utcnow(),
                **model,
            )
            session.add(row)
            session.flush()
            now = utcnow()
            session.execute(
                update(Job)
                .where(*_running(job_id, attempt))
                .values(
                    status=JobStatus.succeeded.value,
                    finished_at=now,
                    metrics=metrics,
                    model_id=row.id,
                )
            )
            session.add(
                JobEvent(
                    job_id=job_id,
                    attempt=attempt,
                    kind="succeeded",
                    message=f"registered {row.name}:{row.version}",
                )
            )
        return row
    except BaseException:
        if final_dir is not None and final_dir.exists() and not staged_dir.exists():
            final_dir.rename(staged_dir)  # the row was not written: the folder is not a model
        raise


def list_models(engine: Engine, *, name: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name, Model.version.desc())
    if name:
        query = query.where(Model.name == name)
    with Session(engine) as session:
        return list(session.scalars(query))


def find_model(engine: Engine, ref: str) -> Model:
    """The registered model ``name`` (its latest version), ``name:version`` or ``name@tag``."""
    if "@" in ref:
        name, _, tag = ref.partition("@")
        with Session(engine) as session:
            tagged = session.get(ModelTag, (name, tag))
        if tagged is None:
            raise ModelNotFound(
                f"model {name!r} has no tag {tag!r}; set one with "
                f"`tuneq models tag {name}:VERSION {tag}`"
            )
        ref = f"{name}:{tagged.version}"
    name, _, version = ref.partition(":")
    query = select(Model).where(Model.name == name)
    if version:
        if not version.isdigit():
            raise ModelNotFound(f"{ref!r}: a version is a number, like {name}:2")
        query = query.where(Model.version == int(version))
    with Session(engine) as session:
        row = session.scalars(query.order_by(Model.version.desc()).limit(1)).first()
    if row is None:
        raise ModelNotFound(
            f"no registered model {ref!r}; `tuneq models` lists them, or pass a model folder"
        )
    return row


def tag_model(engine: Engine, *, ref: str, tag: str) -> Model:
    """Point ``name@tag`` at the model ``ref`` (a tag moves if it pointed elsewhere)."""
    model = find_model(engine, ref)
    with Session(engine) as session, session.begin():
        session.merge(ModelTag(name=model.name, tag=tag, version=model.version, tagged_at=utcnow()))
    return model


def model_tags(engine: Engine) -> dict[tuple[str, int], list[str]]:
    """Tags by (model name, version)."""
    with Session(engine) as session:
        rows = session.scalars(select(ModelTag).order_by(ModelTag.tag)).all()
    tags: dict[tuple[str, int], list[str]] = {}
    for row in rows:
        tags.setdefault((row.name, row.version), []).append(row.tag)
    return tags


def job_model(engine: Engine, job: Job) -> Model | None:
    if job.model_id is None:
        return None
    with Session(engine) as session:
        return session.get(Model, job.model_id)


def create_shards(engine: Engine, *, job_id: str, attempt: int, sizes: list[int]) -> bool:
    """Record the shards of a running scoring job; ``False`` if the lease was lost."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        if session.execute(select(Job.id).where(*_running(job_id, attempt))).first() is None:
            return False
        session.execute(delete(Shard).where(Shard.job_id == job_id))
        start = 0
        for index, size in enumerate(sizes):
            session.add(
                Shard(
                    job_id=job_id,
                    index=index,
                    row_start=start,
                    row_count=size,
                    status=ShardStatus.queued.value,
                    attempt=0,
                    empty_rows=0,
                    published_at=now,
                )
            )
            start += size
        progress = {
            "phase": "scoring",
            "rows": 0,
            "total_rows": start,
            "shards": 0,
            "total_shards": len(sizes),
        }
        session.execute(
            update(Job)
            .where(*_running(job_id, attempt))
            .values(progress=progress, heartbeat_at=now)
        )
        session.add(
            JobEvent(
                job_id=job_id,
                attempt=attempt,
                kind="sharded",
                message=f"{start} rows in {len(sizes)} shards",
            )
        )
    return True


def claim_shard(engine: Engine, *, job_id: str, index: int, worker: str) -> int | None:
    """Take a queued shard of a running job; ``None`` if it is taken, done, or the job ended."""
    job_running = select(Job.id).where(Job.id == job_id, Job.status == JobStatus.running.value)
    with engine.begin() as conn:
        result = conn.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.index == index,
                Shard.status == ShardStatus.queued.value,
                job_running.exists(),
            )
            .values(
                status=ShardStatus.running.value,
                attempt=Shard.attempt + 1,
                worker=worker,
                started_at=utcnow(),
            )
        )
        if result.rowcount != 1:
            return None
        attempt = conn.execute(
            select(Shard.attempt).where(Shard.job_id == job_id, Shard.index == index)
        ).scalar_one()
        return int(attempt)


def finish_shard(
    engine: Engine, *, job_id: str, index: int, attempt: int, empty_rows: int, seconds: float
) -> int | None:
    """Mark a shard done and update the job's progress; returns how many shards are left
    (0: the caller assembles the output), or ``None`` if the shard was not ours to finish."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        # Lock the job row so that exactly one finisher sees zero shards left.
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None or job.status != JobStatus.running.value:
            return None
        result = session.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.index == index,
                Shard.attempt == attempt,
                Shard.status == ShardStatus.running.value,
            )
            .values(
                status=ShardStatus.done.value,
                finished_at=now,
                empty_rows=empty_rows,
                seconds=seconds,
            )
        )
        if getattr(result, "rowcount", 0) != 1:
            return None
        shards = session.execute(
            select(Shard.status, Shard.row_count).where(Shard.job_id == job_id)
        ).all()
        done_rows = sum(rows for status, rows in shards if status == ShardStatus.done.value)
        done = sum(1 for status, _ in shards if status == ShardStatus.done.value)
        total_rows = sum(rows for _, rows in shards)
        elapsed = max(1e-6, (now - aware(job.started_at or now)).total_seconds())
        rate = done_rows / elapsed
        job.progress = {
            "phase": "scoring",
            "rows": done_rows,
            "total_rows": total_rows,
            "shards": done,
            "total_shards": len(shards),
            "rows_per_s": round(rate, 2),
            "eta_s": round((total_rows - done_rows) / rate, 1) if rate else None,
        }
        job.heartbeat_at = now
        return len(shards) - done


def aware(moment: datetime) -> datetime:
    """SQLite hands back timestamps without a zone; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def list_shards(engine: Engine, job_id: str) -> list[Shard]:
    with Session(engine) as session:
        query = select(Shard).where(Shard.job_id == job_id).order_by(Shard.index)
        return list(session.scalars(query))


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


def renew_shard_lease(engine: Engine, *, job_id: str, index: int, attempt: int) -> bool:
    """Heartbeat of a running shard; ``False`` once the shard or its job is taken away."""
    job_running = select(Job.id).where(Job.id == job_id, Job.status == JobStatus.running.value)
    with engine.begin() as conn:
        result = conn.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.index == index,
                Shard.attempt == attempt,
                Shard.status == ShardStatus.running.value,
                job_running.exists(),
            )
            .values(heartbeat_at=utcnow())
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
) -> bool:
    """Put a job back in the queue (a retry, or a job whose worker was lost) and note why."""
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
            conn, job_id=job_id, at=now, attempt=current, kind=to_status.value, message=reason
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


def stale_shards(engine: Engine, *, before: datetime) -> list[Shard]:
    """Running shards of running jobs whose lease expired."""
    query = (
        select(Shard)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Job.status == JobStatus.running.value,
            Shard.status == ShardStatus.running.value,
            func.coalesce(Shard.heartbeat_at, Shard.started_at) < before,
        )
    )
    with Session(engine) as session:
        return list(session.scalars(query))


def requeue_shard(engine: Engine, *, job_id: str, index: int, attempt: int) -> bool:
    with engine.begin() as conn:
        result = conn.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.index == index,
                Shard.attempt == attempt,
                Shard.status == ShardStatus.running.value,
            )
            .values(status=ShardStatus.queued.value, worker=None, published_at=utcnow())
        )
        return result.rowcount == 1


def unclaimed_jobs(engine: Engine, *, before: datetime) -> list[Job]:
    """Queued jobs whose last message went out before ``before``: it may have been lost."""
    query = select(Job).where(
        Job.status.in_(values(WAITING)), func.coalesce(Job.published_at, Job.created_at) < before
    )
    with Session(engine) as session:
        return list(session.scalars(query))


def unclaimed_shards(engine: Engine, *, before: datetime) -> list[tuple[Shard, Job]]:
    """Queued shards of running jobs published before ``before``, with their job."""
    query = (
        select(Shard, Job)
        .join(Job, Job.id == Shard.job_id)
        .where(
            Job.status == JobStatus.running.value,
            Shard.status == ShardStatus.queued.value,
            func.coalesce(Shard.published_at, Job.heartbeat_at) < before,
        )
    )
    with Session(engine) as session:
        return [(shard, job) for shard, job in session.execute(query).all()]


def jobs_with_ids(engine: Engine, job_ids: list[str]) -> list[Job]:
    """The jobs among ``job_ids`` that exist."""
    if not job_ids:
        return []
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
