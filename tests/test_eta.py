"""ETAs for queued jobs: durations from finished jobs, the queue played forward on live workers
(real SQLite or PostgreSQL rows; times set on the rows, not waited for)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, update

from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.schemas.statuses import JobStatus
from tuneq.schemas.tables import Job, utcnow
from tuneq.worker import store
from tuneq.worker.store import workers
from tuneq.worker.store.db import get_engine
from tuneq.worker.views.eta import queue_estimates

NOW = utcnow()


@pytest.fixture
def engine(database_url: str) -> Engine:
    return get_engine(database_url)


def add_job(engine: Engine, spec: FinetuneSpec | ScoreSpec, **row: object) -> str:
    """A job row as a worker would have left it, with ``row``'s columns set."""
    job = store.create_job(engine, spec=spec)
    if row:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job.id).values(**row))
    return job.id


def finished_finetune(engine: Engine, model: str, rows: int, epochs: float, seconds: float) -> None:
    spec = FinetuneSpec(data="/d/old.csv", model=model, epochs=epochs, queue="cpu")
    add_job(
        engine,
        spec,
        status=JobStatus.succeeded.value,
        started_at=NOW - timedelta(hours=1),
        finished_at=NOW - timedelta(hours=1) + timedelta(seconds=seconds),
        metrics={"accuracy": 0.9, "data": {"train_rows": rows}},
    )


def live_worker(engine: Engine, queue: str, processes: int) -> None:
    workers.register_worker(
        engine,
        name=f"host-{queue}:1",
        hostname="host",
        queues=[queue],
        device="cpu",
        concurrency=processes,
        threads=1,
    )


def queued(engine: Engine, priority: str, minutes_ago: float, **fields: object) -> str:
    spec = FinetuneSpec(
        **{
            "data": "/d/new.csv",
            "model": "m",
            "queue": "cpu",
            "priority": priority,
            "epochs": 1,
            **fields,
        }  # fmt: skip
    )
    return add_job(engine, spec, created_at=NOW - timedelta(minutes=minutes_ago))


def test_queued_jobs_run_by_priority_then_arrival_after_the_running_one(engine: Engine) -> None:
    finished_finetune(engine, "m", rows=100, epochs=1, seconds=10)  # 0.10 s per example-epoch
    finished_finetune(engine, "m", rows=100, epochs=2, seconds=24)  # 0.12
    finished_finetune(engine, "m", rows=100, epochs=1, seconds=11)  # 0.11: the median
    live_worker(engine, "cpu", processes=1)
    running = queued(engine, "normal", 30)
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == running)
            .values(status="running", started_at=NOW, progress={"step": 5, "eta_s": 30.0})
        )
    low = queued(engine, "low", 20, train_size=100)
    normal = queued(engine, "normal", 10, train_size=100, epochs=2)
    high = queued(engine, "high", 1, train_size=50)

    estimates = queue_estimates(engine, interval_s=15, now=NOW)
    order = [(e.job_id, e.position, e.priority) for e in estimates]
    assert order == [(running, 0, "normal"), (high, 1, "high"), (normal, 2, "normal"),
                     (low, 3, "low")]  # fmt: skip
    by_job = {e.job_id: e for e in estimates}
    assert by_job[running].end_in_s == 30.0
    assert by_job[high].start_in_s == 30.0
    assert by_job[high].duration_s == pytest.approx(50 * 0.11)
    assert by_job[normal].start_in_s == pytest.approx(30 + 5.5)
    assert by_job[normal].duration_s == pytest.approx(100 * 2 * 0.11)
    assert by_job[low].start_in_s == pytest.approx(30 + 5.5 + 22)
    assert by_job[low].basis == "0.11 s per example and epoch, from 3 fine-tunes of m"


def test_two_processes_take_jobs_side_by_side(engine: Engine) -> None:
    finished_finetune(engine, "m", rows=100, epochs=1, seconds=10)
    live_worker(engine, "cpu", processes=2)
    first = queued(engine, "normal", 3, train_size=100)
    second = queued(engine, "normal", 2, train_size=300)
    third = queued(engine, "normal", 1, train_size=100)
    by_job = {e.job_id: e for e in queue_estimates(engine, interval_s=15, now=NOW)}
    assert (by_job[first].start_in_s, by_job[second].start_in_s) == (0.0, 0.0)
    assert by_job[third].start_in_s == pytest.approx(10.0), "after the shorter of the two"
    assert by_job[third].end_in_s == pytest.approx(20.0)


def test_what_cannot_be_known_is_said(engine: Engine) -> None:
    unknown_size = queued(engine, "normal", 5)  # no train_size, data never trained on
    nobody = add_job(engine, FinetuneSpec(data="/d/x.csv", model="m", queue="gpu"))
    live_worker(engine, "cpu", processes=1)
    after_unknown = queued(engine, "normal", 1, train_size=10)
    by_job = {e.job_id: e for e in queue_estimates(engine, interval_s=15, now=NOW)}
    assert by_job[unknown_size].start_in_s == 0.0
    assert by_job[unknown_size].duration_s is None
    assert by_job[unknown_size].basis == "the training data's size is not known until it is read"
    assert by_job[after_unknown].start_in_s is None, "behind a job of unknown length"
    assert by_job[after_unknown].basis == "no finished fine-tune to go by"
    assert by_job[nobody].start_in_s is None
    assert by_job[nobody].basis == "no live worker listens on queue gpu"


def test_scoring_jobs_go_by_their_model_and_data_by_its_last_size(engine: Engine) -> None:
    for seconds in (40, 60, 50):
        add_job(
            engine,
            ScoreSpec(model="champ", input="/in.csv", output="/out.csv", queue="cpu"),
            status=JobStatus.succeeded.value,
            started_at=NOW - timedelta(hours=2),
            finished_at=NOW - timedelta(hours=2) + timedelta(seconds=seconds),
        )
    finished_finetune(engine, "m", rows=200, epochs=1, seconds=20)  # data /d/old.csv: 200 rows
    live_worker(engine, "cpu", processes=1)
    score = add_job(engine, ScoreSpec(model="champ", input="/b.csv", output="/o.csv", queue="cpu"))
    again = add_job(engine, FinetuneSpec(data="/d/old.csv", model="other", queue="cpu", epochs=1))
    by_job = {e.job_id: e for e in queue_estimates(engine, interval_s=15, now=NOW)}
    assert by_job[score].duration_s == 50.0
    assert by_job[score].basis == "median of 3 scoring jobs of that model"
    assert by_job[again].duration_s == pytest.approx(20.0)
    assert by_job[again].basis == "0.1 s per example and epoch, from 1 fine-tune of any model"
