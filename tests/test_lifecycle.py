"""The job lifecycle's transitions on a real database: what lands, and what each leaves on disk.

Worker processes are left out where the transition itself is the subject; the end-to-end fault
tests (kill -9, cancel on another machine) are in ``test_reliability_e2e.py``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import StatementError

from tests.conftest import Hook
from tuneq.schemas.errors import DataError
from tuneq.schemas.settings import Settings, load_settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.schemas.statuses import JobStatus
from tuneq.schemas.tables import Job
from tuneq.worker import store
from tuneq.worker.jobs import lifecycle, runner, submit
from tuneq.worker.jobs.app import send_job
from tuneq.worker.jobs.lease import JobStopped
from tuneq.worker.jobs.reaper import reap
from tuneq.worker.store.db import get_engine


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database_url)


def running_job(engine: Engine, **fields: object) -> tuple[str, int]:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="q", **fields))
    claim = lifecycle.claim(engine, job.id, worker="w1")
    assert claim is not None
    return job.id, claim.attempt


def checkpoint(settings: Settings, job_id: str, step: int = 20) -> Path:
    folder = lifecycle.checkpoint_folder(settings, job_id) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "tuneq-complete").write_text("")
    return folder


def test_a_stale_attempt_that_fails_deletes_nothing_of_the_new_attempt(
    settings: Settings, engine: Engine
) -> None:
    job_id, first = running_job(engine)
    assert lifecycle.requeue_lost(engine, store.get_job(engine, job_id), lambda *_: None)
    second = lifecycle.claim(engine, job_id, worker="w2")
    assert second is not None and (second.attempt, second.fresh) == (2, False)
    saved = checkpoint(settings, job_id)
    files = lifecycle.job_files(settings, store.get_job(engine, job_id))

    with runner.failures_recorded(engine, job_id, first, files):
        raise DataError("the stale attempt's late error")
    with runner.failures_recorded(engine, job_id, first, files):
        raise JobStopped("the stale attempt sees its lease gone")

    assert saved.is_dir(), "the new attempt's checkpoint is still there"
    job = store.get_job(engine, job_id)
    assert (job.status, job.attempt, job.error) == ("running", 2, None)


def test_a_handed_back_attempt_is_published_again_and_not_counted_as_lost(
    settings: Settings, engine: Engine
) -> None:
    """A stopping worker hands its fine-tune back twice; the third attempt's worker dies. With
    ``max_attempts`` 3 the reaper requeues it: one attempt was lost, not three."""
    job_id, _ = running_job(engine)
    published: list[tuple[str, ...]] = []
    for attempt in (1, 2):
        reason = f"handed back at step {attempt * 7} of 40 by w, which is stopping"
        assert lifecycle.hand_back(engine, job_id, attempt, reason, lambda *a: published.append(a))
        assert not lifecycle.hand_back(engine, job_id, attempt, reason, lambda *_: None), "fenced"
        claim = lifecycle.claim(engine, job_id, worker="w")
        assert claim is not None and (claim.attempt, claim.fresh) == (attempt + 1, False)
    assert published == [(job_id, "q", "normal")] * 2
    long_ago = store.get_job(engine, job_id).heartbeat_at - timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=long_ago))
    assert settings.max_attempts == 3
    actions = reap(settings, publish_job=lambda *a: published.append(a), publish_shard=print)
    assert actions == [f"requeued job {job_id} after attempt 3"]
    job = store.get_job(engine, job_id)
    assert (job.status, job.attempt, len(published)) == ("retrying", 3, 3)
    kinds = [e.kind for e in store.list_events(engine, job_id)]
    assert kinds.count(lifecycle.HANDED_BACK) == 2 and kinds.count("retrying") == 1


def test_a_users_retry_starts_the_count_of_lost_attempts_again(
    settings: Settings, engine: Engine
) -> None:
    """A fine-tune fails twice on an error and a user retries it each time; then its workers
    are lost. With ``max_attempts`` 3 the reaper requeues the third and fourth attempts (one
    and two lost since the retry, not three and four) and fails the fifth, the third lost."""
    job_id, attempt = running_job(engine)
    for _ in range(2):
        assert lifecycle.fail(engine, job_id, attempt, "a bad row")
        lifecycle.retry(engine, job_id, resume=False, publish=lambda *_: None)
        claim = lifecycle.claim(engine, job_id, worker="w")
        assert claim is not None
        attempt = claim.attempt

    def lose_the_worker() -> list[str]:
        long_ago = store.get_job(engine, job_id).heartbeat_at - timedelta(hours=1)
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=long_ago))
        return reap(settings, publish_job=lambda *_: None, publish_shard=print)

    assert settings.max_attempts == 3 and attempt == 3
    for lost in (3, 4):
        assert lose_the_worker() == [f"requeued job {job_id} after attempt {lost}"]
        claim = lifecycle.claim(engine, job_id, worker="w")
        assert claim is not None and claim.attempt == lost + 1
    (action,) = lose_the_worker()
    assert action.startswith(f"failed job {job_id}: worker lost 3 times")
    job = store.get_job(engine, job_id)
    assert (job.status, job.attempt) == ("failed", 5)


def test_a_failure_that_lands_removes_the_jobs_files(settings: Settings, engine: Engine) -> None:
    job_id, attempt = running_job(engine)
    saved = checkpoint(settings, job_id)
    files = lifecycle.job_files(settings, store.get_job(engine, job_id))
    with runner.failures_recorded(engine, job_id, attempt, files):
        raise DataError("no such column")
    assert store.get_job(engine, job_id).error == "no such column"
    assert not saved.parent.exists()


def test_a_spec_this_worker_cannot_read_fails_at_claim(settings: Settings, engine: Engine) -> None:
    job = store.create_job(engine, spec=FinetuneSpec(data="x.csv", queue="q"))
    newer = dict(job.spec, early_exit_policy="aggressive")  # a field from a newer tuneq
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job.id).values(spec=newer))

    assert (
        runner.run_job(
            settings, job.id, worker="w", publish_shard=lambda *_: None, publish_job=lambda *_: None
        )
        is None
    )

    failed = store.get_job(engine, job.id)
    assert (failed.status, failed.attempt) == ("failed", 1)
    assert "cannot read the job's spec" in failed.error and "early_exit_policy" in failed.error
    kinds = [e.kind for e in store.list_events(engine, job.id)]
    assert kinds == ["queued", "running", "failed"]


def test_retry_starts_from_scratch_unless_asked_to_resume(
    settings: Settings, engine: Engine
) -> None:
    job_id, attempt = running_job(engine)
    assert lifecycle.fail(engine, job_id, attempt, "boom")
    published: list[str] = []

    lifecycle.retry(engine, job_id, resume=False, publish=lambda j, *_: published.append(j))
    claim = lifecycle.claim(engine, job_id, worker="w")
    assert claim is not None and claim.fresh
    assert lifecycle.fail(engine, job_id, claim.attempt, "boom again")

    lifecycle.retry(engine, job_id, resume=True, publish=lambda j, *_: published.append(j))
    claim = lifecycle.claim(engine, job_id, worker="w")
    assert claim is not None and not claim.fresh
    assert published == [job_id, job_id]
    events = [(e.kind, e.message) for e in store.list_events(engine, job_id)]
    assert [event for event in events if event[0] != "running"] == [
        ("queued", "job queued"),
        ("failed", "boom"),
        ("retried", "retried by user, from the start"),
        ("failed", "boom again"),
        ("retried", "retried by user, to resume from its newest checkpoint"),
    ]


def test_the_janitor_removes_only_what_ended_jobs_left(settings: Settings, engine: Engine) -> None:
    running_id, _ = running_job(engine)
    live = checkpoint(settings, running_id)
    failed_id, attempt = running_job(engine)
    assert lifecycle.fail(engine, failed_id, attempt, "worker lost 1 times")
    leaked = checkpoint(settings, failed_id)  # written by a worker that died: nobody removed it
    kept_id, attempt = running_job(engine, keep_checkpoints=True)
    assert lifecycle.fail(engine, kept_id, attempt, "worker lost 1 times")
    kept = checkpoint(settings, kept_id)
    stray = lifecycle.staging_folder(settings, failed_id, 1)
    stray.mkdir(parents=True)
    unknown = checkpoint(settings, "not-in-this-database")

    removed = lifecycle.sweep_leftovers(settings, engine)

    assert sorted(removed) == sorted([str(leaked.parent), str(stray)])
    assert live.is_dir() and kept.is_dir() and unknown.is_dir()
    assert not leaked.parent.exists() and not stray.exists()


@pytest.mark.parametrize("end", ["fail", "succeed"])
def test_an_output_a_killed_assembly_left_goes_when_the_job_ends(
    settings: Settings, engine: Engine, tmp_path: Path, end: str
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "scored.csv"
    spec = ScoreSpec(model="m", input="in.csv", output=str(output), queue="q")
    job = store.create_job(engine, spec=spec)
    assert lifecycle.claim(engine, job.id, worker="w1") is not None
    killed = lifecycle.assembly_file(settings, job.id, 1, str(output))
    killed.write_text("id,label\n1,pos\n")  # the worker died while writing the output
    others = [folder / "notes.csv", lifecycle.assembly_file(settings, "other", 1, str(output))]
    for path in others:
        path.write_text("not this job's")
    assert lifecycle.requeue_lost(engine, store.get_job(engine, job.id), lambda *_: None)
    assert lifecycle.claim(engine, job.id, worker="w2") is not None
    files = lifecycle.job_files(settings, store.get_job(engine, job.id))

    if end == "fail":  # as the reaper does after max_attempts
        assert lifecycle.fail(engine, job.id, 2, "worker lost 2 times", cleanup=files)
    else:
        output.write_text("id,label\n1,pos\n")
        assert lifecycle.succeed_with_output(
            engine, job.id, 2, output_path=str(output), metrics={}, cleanup=files
        )

    assert killed.name == f".scored.csv.{job.id}-1.partial" and not killed.exists()
    assert sorted(folder.iterdir()) == sorted([*others, *([output] if end == "succeed" else [])])


def test_a_sweep_whose_publishing_fails_half_way_still_ends_whole(
    settings: Settings, engine: Engine, hook_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    def broker_dies_after_two(app: object, job_id: str, queue: str, priority: str) -> None:
        if len(sent) == 2:
            raise ConnectionError("connection refused")
        send_job(app, job_id, queue, priority)  # type: ignore[arg-type]
        sent.append(job_id)

    monkeypatch.setattr(submit, "send_job", broker_dies_after_two)
    specs = [
        FinetuneSpec(data="x.csv", queue="q", learning_rate=lr) for lr in (1e-5, 2e-5, 3e-5, 4e-5)
    ]
    group = store.new_group(group_id="lr-1", size=4, notify=hook_url)

    with pytest.raises(submit.BrokerUnavailable, match=r"2 of 4 jobs failed unsent"):
        submit.submit_jobs(settings, specs, group=group)

    jobs = store.list_jobs(engine, group_id="lr-1")
    assert len(jobs) == 4, "every row was recorded before any message"
    by_status = sorted((job.status, job.id in sent) for job in jobs)
    assert by_status == [("failed", False), ("failed", False), ("queued", True), ("queued", True)]
    for job in jobs:
        if job.status == "failed":
            assert job.error == "broker unreachable: connection refused"
            assert [e.kind for e in store.list_events(engine, job.id)] == ["queued", "failed"]
    assert Hook.received == [], "the group has not ended yet"
    for job_id in sent:
        lifecycle.cancel(engine, job_id)
    [summary] = Hook.received
    counts = {key: summary[key] for key in ("jobs", "succeeded", "failed", "cancelled")}
    assert (summary["group"], counts) == (
        "lr-1",
        {"jobs": 4, "succeeded": 0, "failed": 2, "cancelled": 2},
    )


def test_the_status_column_holds_only_the_enums_values(engine: Engine) -> None:
    job_id, _ = running_job(engine)
    job = store.get_job(engine, job_id)
    assert job.status is JobStatus.running and f"{job.status}" == "running"

    refused = pytest.raises(StatementError, match="'finished' is not among the defined enum")
    with refused, engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(status="finished"))
    assert store.get_job(engine, job_id).status is JobStatus.running
