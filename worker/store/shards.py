"""The shards of scoring jobs: creation, claims, leases, finishing and progress."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from tuneq.schemas.statuses import JobStatus, ShardStatus
from tuneq.schemas.tables import Job, JobEvent, Shard, aware, utcnow
from tuneq.worker.store.jobs import _running


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


def list_shards(engine: Engine, job_id: str) -> list[Shard]:
    with Session(engine) as session:
        query = select(Shard).where(Shard.job_id == job_id).order_by(Shard.index)
        return list(session.scalars(query))


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
