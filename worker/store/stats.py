"""Counts over the job table for monitoring (``/metrics``): one query each, cheap with
thousands of jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from tuneq.schemas.tables import FINISHED, WAITING, Job, JobStatus, aware, values


@dataclass(frozen=True)
class QueueWait:
    queue: str
    waiting: int
    oldest_created_at: datetime


def job_counts(engine: Engine) -> list[tuple[str, str, str, int]]:
    """``(status, kind, queue, jobs)`` for every combination that has jobs."""
    query = select(Job.status, Job.kind, Job.queue, func.count()).group_by(
        Job.status, Job.kind, Job.queue
    )
    with engine.connect() as conn:
        return [(str(s), kind, queue, n) for s, kind, queue, n in conn.execute(query)]


def queue_waits(engine: Engine) -> list[QueueWait]:
    """Per queue with waiting jobs: how many wait, and when the oldest of them was queued."""
    query = (
        select(Job.queue, func.count(), func.min(Job.created_at))
        .where(Job.status.in_(values(WAITING)))
        .group_by(Job.queue)
    )
    with engine.connect() as conn:
        return [QueueWait(queue, n, aware(oldest)) for queue, n, oldest in conn.execute(query)]


def finished_durations(engine: Engine) -> list[tuple[str, str, float]]:
    """``(kind, status, seconds from start to end)`` of every job that started and ended."""
    query = select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
        Job.status.in_(values(FINISHED)),
        Job.started_at.is_not(None),
        Job.finished_at.is_not(None),
    )
    with engine.connect() as conn:
        return [
            (
                kind,
                str(status),
                (aware(end) - aware(start)).total_seconds(),
            )
            for kind, status, start, end in conn.execute(query)
        ]


def running_progress(engine: Engine) -> list[tuple[str, str, dict[str, Any]]]:
    """``(job id, kind, progress)`` of every running job."""
    query = select(Job.id, Job.kind, Job.progress).where(Job.status == JobStatus.running)
    with engine.connect() as conn:
        return [(job_id, kind, progress or {}) for job_id, kind, progress in conn.execute(query)]
