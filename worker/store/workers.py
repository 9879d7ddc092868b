"""Live workers, in the database: each worker process registers itself with its queues and
device, its reaper renews the row, and anyone can ask who is listening and what they run.

Works with every broker (the broker is not asked), so routing and ``tuneq workers`` behave the
same on Redis and on the embedded broker.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from tuneq.schemas.statuses import JobStatus, ShardStatus
from tuneq.schemas.tables import Job, Shard, Worker, utcnow

# A worker is live while its heartbeat is younger than this many reaper intervals.
MISSED_BEATS = 3


def worker_name() -> str:
    """This worker process's name in the registry: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pool_process_name() -> str:
    """A pool process's name on the jobs and shards it runs: ``host:worker-pid/pid``."""
    return f"{socket.gethostname()}:{os.getppid()}/{os.getpid()}"


@dataclass(frozen=True)
class LiveWorker:
    """A worker and the work in its hands: job ids, and ``job/shard`` for scoring shards."""

    worker: Worker
    running: list[str]


def register_worker(
    engine: Engine,
    *,
    name: str,
    hostname: str,
    queues: list[str],
    device: str,
    concurrency: int,
    threads: int,
) -> None:
    """Record a starting worker (replacing a row of the same name left by a dead one)."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        session.execute(delete(Worker).where(Worker.name == name))
        session.add(
            Worker(
                name=name,
                hostname=hostname,
                queues=queues,
                device=device,
                concurrency=concurrency,
                threads=threads,
                started_at=now,
                heartbeat_at=now,
            )
        )


def beat(engine: Engine, *, name: str, threads: int | None = None) -> None:
    """Renew the worker's row; ``threads``: the torch threads each of its processes has now."""
    values: dict[str, object] = {"heartbeat_at": utcnow()}
    if threads is not None:
        values["threads"] = threads
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.name == name).values(**values))


def unregister_worker(engine: Engine, *, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(Worker).where(Worker.name == name))


def live_workers(
    engine: Engine, *, interval_s: float, now: datetime | None = None
) -> list[LiveWorker]:
    """Workers whose heartbeat is younger than ``MISSED_BEATS`` reaper intervals, by name, each
    with what its pool processes run (their names are ``<worker name>/<pid>``)."""
    since = (now or utcnow()) - timedelta(seconds=MISSED_BEATS * interval_s)
    with Session(engine) as session:
        workers = list(
            session.scalars(
                select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.name)
            )
        )
        jobs = session.execute(
            select(Job.id, Job.worker, Job.kind, Job.progress).where(
                Job.status == JobStatus.running.value
            )
        ).all()
        shards = session.execute(
            select(Shard.job_id, Shard.index, Shard.worker).where(
                Shard.status == ShardStatus.running.value
            )
        ).all()
    # A scoring job is in a worker's hands only while staging or writing; its shards otherwise.
    held = [
        (job_id, owner)
        for job_id, owner, kind, progress in jobs
        if kind != "score" or (progress or {}).get("phase") in ("staging", "writing")
    ]
    held += [(f"{job_id}/{index}", owner) for job_id, index, owner in shards]
    return [
        LiveWorker(
            w, sorted(item for item, owner in held if (owner or "").startswith(w.name + "/"))
        )
        for w in workers
    ]


def listening(engine: Engine, *, queue: str, interval_s: float) -> bool:
    """Whether a live worker takes jobs from ``queue``."""
    return any(queue in live.worker.queues for live in live_workers(engine, interval_s=interval_s))
