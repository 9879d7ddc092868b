"""What is ahead of a queued job, and when it should start and end.

Durations come from measured throughput: finished fine-tunes give seconds per training example
and epoch (per base model where there are some, else over all), finished scoring jobs of a
model their median wall time. The queue is then played forward over the live worker processes
that listen on it: running jobs first (their own progress ETA), then the queued jobs in the
order the broker hands them out (priority, then arrival).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tuneq.schemas.specs import PRIORITY_LEVELS
from tuneq.schemas.statuses import ACTIVE, WAITING, JobStatus, values
from tuneq.schemas.tables import Job, aware, utcnow
from tuneq.worker import store
from tuneq.worker.store import workers

HISTORY = 200  # finished jobs looked at, newest first


@dataclass(frozen=True)
class Estimate:
    """A job's place in its queue and its expected start and duration (``None``: unknown)."""

    job_id: str
    queue: str
    priority: str
    position: int  # 0 while running; 1 for the next job to start, and so on
    start_in_s: float | None
    duration_s: float | None
    basis: str  # where the duration comes from, or why there is none

    @property
    def end_in_s(self) -> float | None:
        if self.start_in_s is None or self.duration_s is None:
            return None
        return self.start_in_s + self.duration_s


@dataclass
class Throughput:
    """Finished jobs' measurements, from which a job's duration is estimated."""

    finetune_s_per_example: dict[str, list[float]]  # base model -> s per example-epoch
    train_rows: dict[str, int]  # data path -> rows last trained on
    score_seconds: dict[str, list[float]]  # model reference -> wall seconds

    def duration(self, job: Job) -> tuple[float | None, str]:
        """Expected wall seconds of ``job`` and how that was worked out."""
        spec = job.spec
        if job.kind == "score":
            runs = self.score_seconds.get(str(spec.get("model")), [])
            if not runs:
                return None, f"no finished scoring job of {spec.get('model')} to go by"
            return statistics.median(runs), f"median of {len(runs)} scoring jobs of that model"
        rows = spec.get("train_size") or self.train_rows.get(str(spec.get("data")))
        if not rows:
            return None, "the training data's size is not known until it is read"
        model = str(spec.get("model"))
        samples = self.finetune_s_per_example.get(model)
        scope = f"of {model}"
        if not samples:
            samples = [s for values in self.finetune_s_per_example.values() for s in values]
            scope = "of any model"
        if not samples:
            return None, "no finished fine-tune to go by"
        rate = statistics.median(samples)
        epochs = float(spec.get("epochs") or 1.0)
        count = f"{len(samples)} fine-tune{'s' if len(samples) != 1 else ''} {scope}"
        return rows * epochs * rate, f"{rate:.3g} s per example and epoch, from {count}"


def measured_throughput(engine: Engine) -> Throughput:
    """Throughput of the newest ``HISTORY`` succeeded jobs (read without their curves and
    tables: only the fields an estimate needs)."""
    query = (
        select(
            Job.kind,
            Job.started_at,
            Job.finished_at,
            Job.spec,
            Job.metrics[("data", "train_rows")].as_integer(),
        )
        .where(Job.status == JobStatus.succeeded.value, Job.started_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(HISTORY)
    )
    with engine.connect() as conn:
        finished = conn.execute(query).all()
    per_example: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    scoring: dict[str, list[float]] = {}
    for kind, started, ended, spec, train_rows in finished:
        if ended is None:
            continue
        seconds = (aware(ended) - aware(started)).total_seconds()
        if kind == "score":
            scoring.setdefault(str(spec.get("model")), []).append(seconds)
            continue
        if not train_rows:
            continue
        rows.setdefault(str(spec.get("data")), int(train_rows))
        epochs = float(spec.get("epochs") or 1.0)
        per_example.setdefault(str(spec.get("model")), []).append(seconds / (train_rows * epochs))
    return Throughput(per_example, rows, scoring)


def wall_seconds(job: Job) -> float | None:
    if job.started_at is None or job.finished_at is None:
        return None
    return (aware(job.finished_at) - aware(job.started_at)).total_seconds()


def queue_estimates(
    engine: Engine,
    *,
    interval_s: float,
    now: datetime | None = None,
    active: list[Job] | None = None,
) -> list[Estimate]:
    """Every running and waiting job (``active``, if the caller has read them already), queue
    by queue, in the order they will run."""
    now = now or utcnow()
    if active is None:
        active = active_jobs(engine)
    processes: dict[str, int] = {}
    for live in workers.live_workers(engine, interval_s=interval_s, now=now):
        for queue in live.worker.queues:
            processes[queue] = processes.get(queue, 0) + live.worker.concurrency
    throughput = measured_throughput(engine)
    estimates: list[Estimate] = []
    for queue in sorted({job.queue for job in active}):
        jobs = [job for job in active if job.queue == queue]
        estimates += play_queue(queue, jobs, processes.get(queue, 0), throughput, now)
    return estimates


def active_jobs(engine: Engine) -> list[Job]:
    """The jobs that wait or run."""
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.status.in_(values(ACTIVE)))))


def job_estimate(engine: Engine, job: Job, *, interval_s: float) -> Estimate | None:
    """When a waiting or running job should start and end; None once it has ended."""
    if JobStatus(job.status) not in ACTIVE:
        return None
    estimates = queue_estimates(engine, interval_s=interval_s)
    return next((e for e in estimates if e.job_id == job.id), None)


def play_queue(
    queue: str, jobs: list[Job], processes: int, throughput: Throughput, now: datetime
) -> list[Estimate]:
    """Run ``queue`` forward on ``processes`` slots: each job starts when a slot frees up."""
    running = [job for job in jobs if job.status == JobStatus.running.value]
    waiting = sorted(
        (job for job in jobs if JobStatus(job.status) in WAITING),
        key=lambda job: (
            PRIORITY_LEVELS.index(store.priority_of(job)),
            aware(job.created_at),
        ),
    )
    slots: list[float | None] = []
    estimates = []
    for job in running:
        remaining, basis = remaining_seconds(job, throughput, now)
        slots.append(remaining)
        estimates.append(Estimate(job.id, queue, store.priority_of(job), 0, 0.0, remaining, basis))
    slots += [0.0] * max(0, processes - len(slots))
    for position, job in enumerate(waiting, start=1):
        duration, basis = throughput.duration(job)
        if not processes:
            estimates.append(
                Estimate(job.id, queue, store.priority_of(job), position, None, duration,
                         f"no live worker listens on queue {queue}")
            )  # fmt: skip
            continue
        known = [slot for slot in slots if slot is not None]
        start = min(known) if len(known) == len(slots) else None
        estimates.append(
            Estimate(job.id, queue, store.priority_of(job), position, start, duration, basis)
        )
        if start is not None:
            index = slots.index(start)
            slots[index] = start + duration if duration is not None else None
    return estimates


def remaining_seconds(job: Job, throughput: Throughput, now: datetime) -> tuple[float | None, str]:
    """How long a running job has left: its own progress ETA, else expected minus elapsed."""
    progress: dict[str, Any] = job.progress or {}
    if progress.get("eta_s") is not None:
        return float(progress["eta_s"]), "the job's own progress"
    duration, basis = throughput.duration(job)
    if duration is None or job.started_at is None:
        return None, basis
    elapsed = (now - aware(job.started_at)).total_seconds()
    return max(0.0, duration - elapsed), basis
