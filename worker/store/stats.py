"""Counts over the job table for monitoring (``/metrics``): one query each, cheap with
thousands of jobs."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, select

from tuneq.schemas.statuses import FINISHED, WAITING, JobStatus, values
from tuneq.schemas.tables import Job, JobEvent, aware


@dataclass(frozen=True)
class QueueWait:
    queue: str
    waiting: int
    oldest_since: datetime


def job_counts(engine: Engine) -> list[tuple[str, str, str, int]]:
    """``(status, kind, queue, jobs)`` for every combination that has jobs."""
    query = select(Job.status, Job.kind, Job.queue, func.count()).group_by(
        Job.status, Job.kind, Job.queue
    )
    with engine.connect() as conn:
        return [(str(s), kind, queue, n) for s, kind, queue, n in conn.execute(query)]


def queue_waits(engine: Engine) -> list[QueueWait]:
    """Per queue with waiting jobs: how many wait, and since when the longest-waiting one
    has (its latest ``queued`` or ``retrying`` event: a retried week-old job waits since its
    retry; one whose message was published again, since it was first queued)."""
    waiting = Job.status.in_(values(WAITING))
    entered = (
        select(JobEvent.job_id, func.max(JobEvent.at).label("at"))
        .where(
            JobEvent.kind.in_([JobStatus.queued.value, JobStatus.retrying.value]),
            JobEvent.job_id.in_(select(Job.id).where(waiting)),
        )
        .group_by(JobEvent.job_id)
        .subquery()
    )
    query = (
        select(Job.queue, func.count(), func.min(func.coalesce(entered.c.at, Job.created_at)))
        .select_from(Job)
        .outerjoin(entered, entered.c.job_id == Job.id)
        .where(waiting)
        .group_by(Job.queue)
    )
    with engine.connect() as conn:
        return [QueueWait(queue, n, aware(oldest)) for queue, n, oldest in conn.execute(query)]


@dataclass(frozen=True)
class Durations:
    """How long the finished jobs of one kind and status took: how many, their total
    seconds, and how many took at most each bound (a cumulative histogram)."""

    kind: str
    status: str
    count: int
    total_s: float
    at_most: dict[float, int]


def finished_durations(engine: Engine, bounds: Sequence[float]) -> list[Durations]:
    """Per kind and status of the jobs that started and ended, a histogram of their durations
    over ``bounds`` (seconds, ascending), counted by the database from an index."""
    finished = select(Job.kind, Job.status, duration_s(engine).label("seconds")).where(
        Job.status.in_(values(FINISHED)),
        Job.started_at.is_not(None),
        Job.finished_at.is_not(None),
    )
    rows = finished.cte("finished")
    if engine.dialect.name == "postgresql" or sqlite3.sqlite_version_info >= (3, 35):
        rows = rows.prefix_with("MATERIALIZED")  # the seconds once per row, not once per bound
    bucket = case(
        *[(rows.c.seconds <= bound, index) for index, bound in enumerate(bounds)],
        else_=len(bounds),
    ).label("bucket")
    query = select(
        rows.c.kind, rows.c.status, bucket, func.count(), func.sum(rows.c.seconds)
    ).group_by(rows.c.kind, rows.c.status, bucket)
    counted: dict[tuple[str, str], list[int]] = {}
    totals: dict[tuple[str, str], float] = {}
    with engine.connect() as conn:
        for kind, status, index, count, total in conn.execute(query):
            key = (kind, str(status))
            counted.setdefault(key, [0] * (len(bounds) + 1))[index] = count
            totals[key] = totals.get(key, 0.0) + float(total or 0.0)
    return [
        Durations(kind, status, sum(counts), totals[(kind, status)],
                  dict(zip(bounds, itertools.accumulate(counts[:-1]), strict=True)))
        for (kind, status), counts in sorted(counted.items())
    ]  # fmt: skip


def duration_s(engine: Engine) -> ColumnElement[Any]:
    """Seconds from a job's start to its end, as SQL for this database."""
    if engine.dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    # SQLite keeps timestamps as UTC text, which julianday() reads.
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


def running_speeds(engine: Engine) -> list[tuple[str, str, float | None]]:
    """``(job id, kind, speed)`` of every running job: steps/s of a fine-tune, rows/s of a
    scoring job, as its progress last said (None before it said)."""
    progress = Job.progress
    query = select(
        Job.id,
        Job.kind,
        progress["steps_per_s"].as_float(),
        progress["rows_per_s"].as_float(),
    ).where(Job.status == JobStatus.running)
    with engine.connect() as conn:
        return [
            (job_id, kind, steps if kind == "finetune" else rows)
            for job_id, kind, steps, rows in conn.execute(query)
        ]
