"""Groups of jobs (sweeps) and their one end-of-group notification."""

from __future__ import annotations

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from tuneq.schemas.statuses import FINISHED, values
from tuneq.schemas.tables import Job, JobGroup, utcnow


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


def list_groups(engine: Engine, *, limit: int = 100) -> list[dict[str, object]]:
    """The newest groups first, each with its size and how many of its jobs are in each
    state."""
    with Session(engine) as session:
        groups = list(
            session.scalars(select(JobGroup).order_by(JobGroup.created_at.desc()).limit(limit))
        )
        counts = session.execute(
            select(Job.group_id, Job.status, func.count())
            .where(Job.group_id.in_([g.id for g in groups]))
            .group_by(Job.group_id, Job.status)
        ).all()
    by_group: dict[str, dict[str, int]] = {}
    for group_id, status, count in counts:
        by_group.setdefault(group_id, {})[str(status)] = count
    return [
        {
            "group": g.id,
            "size": g.size,
            "created_at": g.created_at.isoformat(),
            "statuses": by_group.get(g.id, {}),
        }
        for g in groups
    ]
